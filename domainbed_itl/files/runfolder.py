"""A run folder: a long computation's outputs, safe across crashes, resumes and overwrites.

See docs/files.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    Type, Union)

import torch

from .. import __version__
from .atomic import write_atomic
from .errors import OVERWRITE, RESUME, Spell, Worded, keyword, option, reworded, spelled, wording
from .reading import UnreadableFile, load_tensors, read_text
from .runlock import CONTROL_PREFIX, folder_lock, is_control_entry
from .schemas import (CHECKPOINT_VERSIONS, Checkpoint, MetricsRecord, SchemaError, check,
                      check_version)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOSS = "loss.json"
# Where --overwrite keeps the previous run until the new one has written its first checkpoint.
REPLACED = CONTROL_PREFIX + "replaced"
CHECKPOINT_VERSION = max(CHECKPOINT_VERSIONS)
# The fields every metrics record has (metrics.jsonl; plot_meta and plot_search read them).
REQUIRED = tuple(name for name, field in MetricsRecord.model_fields.items() if field.is_required())

Log = Callable[[str], None]


class SavesItself(Protocol):
    """A view written beside the checkpoint that saves itself, such as a loss
    (`domainbed_itl.losses.lossfile.LossSpec`)."""

    def save(self, path: Path, overwrite: bool = False) -> Path:
        """Write the view to `path` (atomically)."""


class RunDirError(Worded, RuntimeError):
    """A run folder that cannot be used as asked (would overwrite, or cannot resume); `remedy`
    names the options of the call that fix it (docs/files.md), `path` the folder or file."""


@dataclass(frozen=True)
class RunKind:
    """A kind of run: its name in messages, its checkpoint's format tag, what one unit of its
    progress is called, the files it writes (those --overwrite moves aside) and its checkpoint's
    schema (domainbed_itl.files.schemas; the envelope alone by default)."""

    name: str
    format: str
    unit: str
    outputs: Tuple[str, ...] = (CHECKPOINT, METRICS, LOSS)
    schema: Type[Checkpoint] = Checkpoint


def log_stderr(message: str) -> None:
    """The default `log` of run folders: a line on stderr."""
    print(message, file=sys.stderr, flush=True)


def now() -> str:
    """The local time as provenance records it."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def source_commit() -> Optional[str]:
    """The git commit of this package's source tree, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def on_cpu(value: Any) -> Any:
    """`value` with every tensor in it (in dicts, lists and tuples) detached onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def load_checkpoint(path: Union[str, os.PathLike], kind: RunKind) -> Dict[str, Any]:
    """Read a checkpoint of `kind`, checked against its schema; RunDirError naming the file and
    the problem if it is not one (or is of a newer version)."""
    path = Path(path)
    try:
        ckpt = load_tensors(path, "checkpoint")
    except UnreadableFile as e:  # damaged, foreign, or holding code
        raise RunDirError(f"cannot read checkpoint {path}: it {e.reason}; the run cannot "
                          f"continue from it ({OVERWRITE} starts it again)", path=path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != kind.format:
        raise RunDirError(f"{path} is not a domainbed-itl {kind.name} checkpoint")
    where = f"checkpoint {path}"
    try:
        check_version(ckpt, CHECKPOINT_VERSIONS, where)
        check(kind.schema, ckpt, where)
    except SchemaError as e:
        raise RunDirError(f"{e}; the run cannot continue from it ({OVERWRITE} starts it again)",
                          path=path) from None
    return ckpt


def progress(ckpt: Mapping[str, Any]) -> Tuple[int, str]:
    """(done, unit) of a checkpoint of any kind; version 1 counted its records (a meta-training
    one, which holds a trainer, one per outer step)."""
    if "done" in ckpt:
        return int(ckpt["done"]), str(ckpt["unit"])
    return len(ckpt.get("metrics", ())), "outer steps" if "trainer" in ckpt else "records"


def read_metrics(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl file, each checked (domainbed_itl.files.schemas
    MetricsRecord, which keeps only the fields it declares) and in step order; ValueError
    naming the line of a malformed one."""
    path = Path(path)
    lines = read_text(path, what="metrics file").splitlines()
    records: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = check(MetricsRecord, json.loads(line), where).model_dump(exclude_none=True)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if records and record["step"] <= records[-1]["step"]:
            raise ValueError(f"{where}: step {record['step']} after step {records[-1]['step']}; "
                             "expected the steps in increasing order")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no metrics records")
    return records


def resume_hint(path: Union[str, os.PathLike], spell: Spell = keyword) -> str:
    """What to do after a run in `path` was interrupted (its options written by `spell`)."""
    if (Path(path) / CHECKPOINT).is_file():
        return spelled(f"the run in {path} can be resumed with {RESUME}", spell)
    return f"the run in {path} had not written a checkpoint yet; run the command again to start it"


def describe_run(folder: Path, outputs: Sequence[str]) -> str:
    """The run whose `outputs` are in `folder`, in a few words (its progress and files)."""
    files = [name for name in outputs if (folder / name).exists()]
    done = ""
    if CHECKPOINT in files:
        try:  # a checkpoint of any kind of run of this package
            ckpt = load_tensors(folder / CHECKPOINT, "checkpoint")
            check(Checkpoint, ckpt, str(folder / CHECKPOINT))
            done = "{} {}, ".format(*progress(ckpt))
        except Exception:  # torch raises many types for corrupt or foreign files
            done = "an unreadable checkpoint, "
    return f"{done}{', '.join(files)}"


def _check(path: Path, resume: bool, overwrite: bool, must_resume: bool = False) -> None:
    """RunDirError unless `path` may be used with these flags; changes nothing. A non-empty
    folder needs --resume (with a checkpoint there) or --overwrite; with `must_resume` (the
    --resume flag itself) a folder without a checkpoint is refused too."""
    if resume and overwrite:
        raise RunDirError(f"{RESUME} and {OVERWRITE} exclude each other: resume continues the run "
                          f"in {path}, overwrite starts it again", path=path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output dir {path} exists and is not a directory", path=path)
    contents = (sorted(p.name for p in path.iterdir() if not is_control_entry(p.name))
                if path.is_dir() else [])
    if must_resume and not contents and not (path / REPLACED).is_dir():  # REPLACED: comes back
        raise RunDirError(f"cannot resume: {path} holds no {CHECKPOINT}, so there is no run to "
                          f"resume; leave out {RESUME} to start one there", path=path)
    if not contents or overwrite:
        return
    if not resume:
        raise RunDirError(f"output dir {path} is not empty ({', '.join(contents[:5])}); pass "
                          f"{RESUME} to continue the run there or {OVERWRITE} to start it again",
                          path=path)
    if not (path / CHECKPOINT).is_file():
        raise RunDirError(f"cannot resume: {path} has no {CHECKPOINT} but is not empty "
                          f"({', '.join(contents[:5])}); pass {OVERWRITE} to start again there",
                          path=path)


def _restore_replaced(path: Path) -> None:
    """Move the previous run's files back from REPLACED (keeping any file the new run wrote)."""
    aside = path / REPLACED
    for entry in aside.iterdir():
        if not (path / entry.name).exists():
            os.replace(entry, path / entry.name)
    shutil.rmtree(aside)


def finish_interrupted_overwrite(path: Path, outputs: Sequence[str], log: Log) -> None:
    """Complete an --overwrite whose process died: delete the previous run once a new checkpoint
    exists, else move it back."""
    aside = path / REPLACED
    if not aside.is_dir():
        return
    if (path / CHECKPOINT).is_file():
        shutil.rmtree(aside)
        log(f"note: deleted the run ({path}) that an interrupted overwrite had replaced; "
            "the new run had written its first checkpoint")
    else:
        _restore_replaced(path)
        log(f"note: an interrupted overwrite in {path} never wrote a checkpoint; moved the "
            f"previous run back ({describe_run(path, outputs)})")


class RunFolder:
    """An opened run folder (`open_run_folder`): its kind, the checkpoint a resume starts from
    (`checkpoint`, None for a new run), and the writing of checkpoints and views."""

    def __init__(self, path: Path, kind: RunKind, checkpoint: Optional[Dict[str, Any]], log: Log):
        self.path, self.kind, self.checkpoint, self.log = path, kind, checkpoint, log
        self.replaced: Optional[str] = None  # what --overwrite moved aside, until discarded
        self.device: Optional[str] = None
        self.provenance: Dict[str, Any] = {}

    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint is."""
        return self.path / CHECKPOINT

    @property
    def done(self) -> int:
        """Units of progress in the checkpoint resumed from (0 for a new run)."""
        return 0 if self.checkpoint is None else progress(self.checkpoint)[0]

    def refuse_changes(self, saved: Mapping[str, Any], wanted: Mapping[str, Any],
                       ignore: Sequence[str] = ()) -> None:
        """RunDirError naming every setting of `wanted` (but `ignore`) that differs from `saved`."""
        changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in wanted.items()
                   if k not in ignore and saved.get(k) != v]
        if changed:
            raise RunDirError(f"cannot resume {self.checkpoint_path} with different settings: "
                              + "; ".join(changed))

    def refuse_other(self, what: str, saved: Any, current: Any, hint: str = "") -> None:
        """RunDirError unless `current` equals the checkpoint's `saved` (`what` names them)."""
        if saved != current:
            raise RunDirError(f"cannot resume {self.checkpoint_path}: {what} differ from the "
                              f"checkpoint's ({saved} in the checkpoint, {current} now){hint}")

    def begin(self, target: Optional[int], device: Union[str, torch.device],
              provenance: Mapping[str, Any]) -> None:
        """Start the run, or continue it, towards `target` units (None: as many as it takes) on
        `device`, with the caller's `provenance` (its "command" among it). A resume on another
        device type, or to fewer units than are done, is refused; a resume that has work left
        is appended to the checkpoint's provenance."""
        device_type = torch.device(device).type
        if self.checkpoint is not None:
            saved = self.checkpoint.get("device")  # None: version 1 did not record it
            if saved is not None and saved != device_type:
                raise RunDirError(f"cannot resume {self.checkpoint_path} on {device_type}: it was "
                                  f"written on {saved}; resume it on {saved}")
            if target is not None and target < self.done:
                raise RunDirError(f"cannot resume {self.checkpoint_path} to {target} "
                                  f"{self.kind.unit}: the run has done {self.done} already")
        self.device = device_type
        self.provenance = self._provenance(dict(provenance), target)

    def _provenance(self, given: Dict[str, Any], target: Optional[int]) -> Dict[str, Any]:
        if self.checkpoint is None:
            return {**given, "date": now()}
        saved = self.checkpoint.get("provenance")
        if saved is None:  # version 1 holds none: the resuming command's
            return given
        if target == self.done:
            return dict(saved)
        resume = {"command": given.get("command"), "date": now(), "from_step": self.done}
        return {**saved, "resumed": [*saved.get("resumed", []), resume]}

    def save_checkpoint(self, state: Mapping[str, Any], done: int,
                        records: Optional[Sequence[Mapping[str, Any]]] = None,
                        loss: Optional[SavesItself] = None) -> None:
        """Replace the checkpoint by `state` (after `begin`), `done` units in, then its views
        (`write_views`, when `records` are given). The first one of an --overwrite run deletes
        the run it replaced."""
        checkpoint = {"format": self.kind.format, "version": CHECKPOINT_VERSION,
                      "package_version": __version__, "unit": self.kind.unit, "done": done,
                      "device": self.device, "provenance": self.provenance, **state}
        buffer = io.BytesIO()
        torch.save(on_cpu(checkpoint), buffer)
        write_atomic(self.checkpoint_path, buffer.getvalue(), overwrite=True)
        if records is not None:
            self.write_views(records, loss)
        if self.replaced is not None:
            shutil.rmtree(self.path / REPLACED)
            self.log(f"overwrite: replaced the previous run in {self.path} ({self.replaced})")
            self.replaced = None

    def write_views(self, records: Sequence[Mapping[str, Any]], loss: Optional[SavesItself]) -> None:
        """Replace metrics.jsonl by `records` (one line each) and loss.json by `loss` (if any)."""
        write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records),
                     overwrite=True)
        if loss is not None:
            loss.save(self.path / LOSS, overwrite=True)

    def _move_aside(self) -> None:
        """--overwrite: move the previous run's outputs into REPLACED."""
        present = [name for name in self.kind.outputs if (self.path / name).exists()]
        if not present:
            return
        self.replaced = describe_run(self.path, self.kind.outputs)
        (self.path / REPLACED).mkdir()
        for name in present:
            os.replace(self.path / name, self.path / REPLACED / name)
        self.log(f"overwrite: moved the previous run in {self.path} ({self.replaced}) aside to "
                 f"{self.path / REPLACED}; it is deleted once this run writes its first checkpoint")

    @contextlib.contextmanager
    def _replacing(self) -> Iterator[None]:
        """If the run stops before its first checkpoint, the run --overwrite replaced comes back
        (a FloatingPointError, such as a non-finite stop, then says so)."""
        try:
            yield
        except BaseException as error:
            if self.replaced is None or not (self.path / REPLACED).is_dir():
                raise
            if self.checkpoint_path.is_file():  # stopped right after its first checkpoint
                finish_interrupted_overwrite(self.path, self.kind.outputs, self.log)
                raise
            _restore_replaced(self.path)
            if isinstance(error, FloatingPointError):
                text = (f"{wording(error)}; {option('overwrite', 'the overwrite')} kept the "
                        f"previous run ({self.replaced}) in {self.path}")
                raise reworded(type(error)(spelled(text)), text, path=self.path) from error
            self.log(f"overwrite: this run stopped before its first checkpoint; the previous "
                     f"run ({self.replaced}) is back in {self.path}")
            raise


@contextlib.contextmanager
def open_run_folder(path: Union[str, os.PathLike], kind: RunKind, *, resume: bool = False,
                    overwrite: bool = False, command: Optional[str] = None,
                    log: Log = log_stderr, must_resume: bool = False) -> Iterator[RunFolder]:
    """Check `path` for a `kind` run with these flags, lock it (creating it) for the block, and
    yield it as a RunFolder; its `checkpoint` is loaded when `resume` finds one. With
    `must_resume` (a command's --resume) a folder without a checkpoint is refused.

    Raises RunDirError for a folder that cannot be used so, runlock.FolderLocked while another
    process writes into it. `command` names this run to a second writer (default: this
    process's command line); `log` receives the notes on replaced runs.
    """
    path = Path(path)
    _check(path, resume, overwrite, must_resume)  # a refused folder is left as it was, no lock file
    with folder_lock(path, command=command):
        finish_interrupted_overwrite(path, kind.outputs, log)
        _check(path, resume, overwrite, must_resume)  # as another writer may have left it
        ckpt = load_checkpoint(path / CHECKPOINT, kind) if resume and (path / CHECKPOINT).is_file() else None
        folder = RunFolder(path, kind, ckpt, log)
        if overwrite:
            folder._move_aside()
        with folder._replacing():
            yield folder


@contextlib.contextmanager
def using_run_folder(target: Union[str, os.PathLike, RunFolder], kind: RunKind, *, resume: bool,
                     overwrite: bool, command: Optional[str], log: Log) -> Iterator[RunFolder]:
    """`target` itself if it is an opened RunFolder of `kind`, else `open_run_folder(target, ...)`
    (where `resume` asks for a run to continue: a folder without one is refused)."""
    if isinstance(target, RunFolder):
        if target.kind != kind:
            raise ValueError(f"{target.path} was opened for a {target.kind.name} run, not {kind.name}")
        yield target
        return
    with open_run_folder(target, kind, resume=resume, overwrite=overwrite, command=command,
                         log=log, must_resume=resume) as folder:
        yield folder
