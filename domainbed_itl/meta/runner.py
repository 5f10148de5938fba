"""A meta-training run on disk: output-dir protection, atomic checkpoints, metrics and loss.json.

The run directory holds three files, all replaced atomically after every outer step:

- checkpoint.pt  config, data fingerprint, initial ω, trainer state and every metrics record;
                 the source of truth, written first;
- metrics.jsonl  one JSON line per outer step (rewritten from the checkpoint's records);
- loss.json      the current ω as a loss file (domainbed_itl.losses.save_loss).

A crash between two of these writes is repaired on --resume, which rewrites metrics.jsonl and
loss.json from the checkpoint. A resumed run repeats the uninterrupted run exactly (bitwise on
the same device) because the trainer's randomness depends only on (seed, step).

One writer per run directory: a run holds the directory's lock (domainbed_itl.files.runlock) while it
works, and a second run into it is refused with the holder's process id, host, start time and
command. --overwrite loses nothing before the new run has something to show: the previous run's
files are moved aside into `.domainbed_itl.replaced/` and deleted only once the new run has
written its first checkpoint; a new run that stops before that moves them back. A run killed in
between leaves them aside, and the next run in the directory finishes the job (deletes them if
the new checkpoint exists, else moves them back) before anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from tqdm import tqdm

from .. import __version__
from ..files.atomic import write_atomic
from ..losses.lossfile import LossSpec, save_loss
from ..files.runlock import CONTROL_PREFIX, folder_lock, is_control_entry
from .data import DomainData
from .config import MetaConfig
from .trainer import MetaTrainer, NonFiniteError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOSS = "loss.json"
OUTPUTS = (CHECKPOINT, METRICS, LOSS)
# Where --overwrite keeps the previous run until the new one has written its first checkpoint.
REPLACED = CONTROL_PREFIX + "replaced"
CHECKPOINT_FORMAT = "domainbed-itl-meta-checkpoint"
# Config fields a resumed run may change: the number of steps to reach.
RESUMABLE_CHANGES = ("outer_steps",)


class RunDirError(RuntimeError):
    """An output directory that cannot be used as asked (would overwrite, or cannot resume)."""


def data_fingerprint(data: DomainData) -> Dict[str, Any]:
    """Dataset name, environments, domain sizes and a SHA-256 of every tensor's bytes."""
    digest = hashlib.sha256()
    for x, y in data.domains:
        for t in (x, y):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"dataset": data.name, "environments": list(data.environments),
            "num_classes": data.num_classes, "domain_sizes": [len(y) for _, y in data.domains],
            "sha256": digest.hexdigest()}


def _save_checkpoint(path: Path, checkpoint: Dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getvalue(), overwrite=True)


def _write_metrics(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records), overwrite=True)


def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT,
                    kind: str = "meta-training") -> Dict[str, Any]:
    """Read a checkpoint of format `fmt` (a `kind` run's); raise RunDirError naming the file if it
    is not one."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise RunDirError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise RunDirError(f"{path} is not a domainbed-itl {kind} checkpoint")
    return ckpt


def check_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless `output_dir` may be used with these flags; changes nothing.

    A non-empty directory needs --resume (it must then hold a checkpoint) or --overwrite;
    --resume in an empty or missing directory starts the run.
    """
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues the run in "
                          f"{output_dir}, overwrite starts it again")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output dir {output_dir} exists and is not a directory")
    contents = (sorted(p.name for p in output_dir.iterdir() if not is_control_entry(p.name))
                if output_dir.is_dir() else [])
    if not contents or overwrite:
        return
    if not resume:
        raise RunDirError(f"output dir {output_dir} is not empty ({', '.join(contents[:5])}); pass "
                          "--resume to continue the run there or --overwrite to start it again")
    if not (output_dir / CHECKPOINT).is_file():
        raise RunDirError(f"cannot resume: {output_dir} has no {CHECKPOINT} but is not empty "
                          f"({', '.join(contents[:5])}); pass --overwrite to start again there")


def log_stderr(message: str) -> None:
    """The default `log` of run folders: a line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _describe_run(folder: Path) -> str:
    """The run whose outputs are in `folder`, in a few words (its steps or records and files)."""
    files = [name for name in OUTPUTS if (folder / name).exists()]
    steps = ""
    if CHECKPOINT in files:
        try:  # a meta-training checkpoint, or another run's of this package (e.g. CMA-ES)
            ckpt = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
            steps = (f"{ckpt['trainer']['steps_done']} outer steps, " if ckpt["format"] == CHECKPOINT_FORMAT
                     else f"{len(ckpt['metrics'])} records, ")
        except Exception:  # torch raises many types for corrupt or foreign files
            steps = "an unreadable checkpoint, "
    return f"{steps}{', '.join(files)}"


def _restore_replaced(output_dir: Path) -> None:
    """Move the previous run's files back from REPLACED (keeping any file the new run wrote)."""
    aside = output_dir / REPLACED
    for path in aside.iterdir():
        if not (output_dir / path.name).exists():
            os.replace(path, output_dir / path.name)
    shutil.rmtree(aside)


def finish_interrupted_overwrite(output_dir: Path, log: Callable[[str], None]) -> None:
    """Complete an --overwrite whose process died: delete the previous run once a new checkpoint
    exists, else move it back."""
    aside = output_dir / REPLACED
    if not aside.is_dir():
        return
    if (output_dir / CHECKPOINT).is_file():
        shutil.rmtree(aside)
        log(f"note: deleted the run ({output_dir}) that an interrupted --overwrite had replaced; "
            "the new run had written its first checkpoint")
    else:
        _restore_replaced(output_dir)
        log(f"note: an interrupted --overwrite in {output_dir} never wrote a checkpoint; moved the "
            f"previous run back ({_describe_run(output_dir)})")


@contextlib.contextmanager
def replacing(output_dir: Path, replaced: Optional[str],
              log: Callable[[str], None]) -> Iterator[None]:
    """Guard the work of a run that --overwrite started (`replaced`: what `move_aside` moved
    aside, None for none): if it stops before its first checkpoint, the previous run comes back
    (a FloatingPointError, such as NonFiniteError, then says so); right after it, the previous
    run is deleted."""
    try:
        yield
    except BaseException as error:
        if replaced is not None and (output_dir / REPLACED).is_dir():
            if (output_dir / CHECKPOINT).is_file():  # stopped right after its first checkpoint
                finish_interrupted_overwrite(output_dir, log)
                raise
            _restore_replaced(output_dir)
            if isinstance(error, FloatingPointError):
                raise type(error)(f"{error}; --overwrite kept the previous run ({replaced}) "
                                  f"in {output_dir}") from error
            log(f"--overwrite: this run stopped before its first checkpoint; the previous run "
                f"({replaced}) is back in {output_dir}")
        raise


def discard_replaced(output_dir: Path, replaced: Optional[str], log: Callable[[str], None]) -> None:
    """Once the new run has written a checkpoint: delete the run --overwrite moved aside."""
    if replaced is not None and (output_dir / REPLACED).is_dir():
        shutil.rmtree(output_dir / REPLACED)
        log(f"--overwrite: replaced the previous run in {output_dir} ({replaced})")


def move_aside(output_dir: Path) -> Optional[str]:
    """Move a previous run's outputs into REPLACED; what they were, or None if there were none."""
    present = [name for name in OUTPUTS if (output_dir / name).exists()]
    if not present:
        return None
    description = _describe_run(output_dir)
    (output_dir / REPLACED).mkdir()
    for name in present:
        os.replace(output_dir / name, output_dir / REPLACED / name)
    return description


def _check_resumable(ckpt: Dict[str, Any], config: MetaConfig, fingerprint: Dict[str, Any],
                     init_omega: List[float], path: Path) -> None:
    # Settings added after a checkpoint was written took their default values there.
    saved = {**MetaConfig().to_dict(), **ckpt["config"]}
    wanted = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in wanted.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise RunDirError(f"cannot resume {path} with different settings: " + "; ".join(changed))
    if ckpt["data"] != fingerprint:
        raise RunDirError(f"cannot resume {path}: the data differ from the checkpoint's "
                          f"({ckpt['data']} vs {fingerprint})")
    if ckpt["init_omega"] != init_omega:
        raise RunDirError(f"cannot resume {path}: the initial loss parameters differ "
                          f"({ckpt['init_omega']} in the checkpoint, {init_omega} now); start "
                          "from the same --init as the interrupted run")


def source_commit() -> Optional[str]:
    """The git commit of this package's source tree, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def new_trainer(data: DomainData, config: MetaConfig, init: Optional[LossSpec],
                device: torch.device | str) -> MetaTrainer:
    """A MetaTrainer on `data` starting from the loss `init` (default: the family's own start);
    ValueError when `init` is not of the config's family and order."""
    if init is not None and (init.family, init.order) != (config.family, config.order):
        raise ValueError(f"the initial loss is a {init.family} loss of order {init.order}, but the "
                         f"config searches {config.family} (order {config.order})")
    return MetaTrainer(data.domains, data.num_classes, config,
                       None if init is None else init.parameters, device=device)


def run_meta_training(data: DomainData, config: MetaConfig, output_dir: str | os.PathLike, *,
                      init: Optional[LossSpec] = None, resume: bool = False,
                      overwrite: bool = False, device: str | torch.device = "cpu",
                      progress: bool = True,
                      provenance: Optional[Dict[str, Any]] = None,
                      log: Callable[[str], None] = log_stderr) -> MetaTrainer:
    """Meta-train on `data` into `output_dir` until config.outer_steps outer steps are done.

    init: the starting loss (its family must be config's); None starts from the family default.
    provenance: extra entries for loss.json's provenance (e.g. the command and preset; its
    "command" also names this run to a second writer). log: where notes on replaced runs go.
    Raises RunDirError for an unusable output dir, runlock.FolderLocked while another process
    writes into it, and NonFiniteError (after keeping the last good checkpoint) when ω, a loss
    or a hypergradient stops being finite.
    """
    output_dir = Path(output_dir)
    trainer = new_trainer(data, config, init, device)
    check_output_dir(output_dir, resume, overwrite)  # before the lock creates the directory
    with folder_lock(output_dir, command=(provenance or {}).get("command")):
        finish_interrupted_overwrite(output_dir, log)
        check_output_dir(output_dir, resume, overwrite)
        ckpt = (load_checkpoint(output_dir / CHECKPOINT)
                if resume and (output_dir / CHECKPOINT).is_file() else None)
        init_omega = trainer.omega.tolist()
        fingerprint = data_fingerprint(data)
        records: List[Dict[str, Any]] = []
        if ckpt is not None:
            _check_resumable(ckpt, config, fingerprint, init_omega, output_dir / CHECKPOINT)
            trainer.load_state_dict(ckpt["trainer"])
            records = list(ckpt["metrics"])
        replaced = move_aside(output_dir) if overwrite else None
        if replaced is not None:
            log(f"--overwrite: moved the previous run in {output_dir} ({replaced}) aside to "
                f"{output_dir / REPLACED}; it is deleted once this run writes its first checkpoint")
        with replacing(output_dir, replaced, log):
            _train(trainer, data, config, output_dir, ckpt is not None, records, init_omega,
                   fingerprint, progress, provenance, replaced, log)
    return trainer


def _train(trainer: MetaTrainer, data: DomainData, config: MetaConfig, output_dir: Path,
           resumed: bool, records: List[Dict[str, Any]], init_omega: List[float],
           fingerprint: Dict[str, Any], progress: bool, provenance: Optional[Dict[str, Any]],
           replaced: Optional[str], log: Callable[[str], None]) -> None:
    """The outer loop of run_meta_training, writing the checkpoint and its views after each step."""
    commit = source_commit()

    def full_provenance() -> Dict[str, Any]:
        return {"meta_train_dataset": data.name, "steps": trainer.steps_done, "seed": config.seed,
                "package_version": __version__, "source_commit": commit, **(provenance or {}),
                "meta_config": config.to_dict(),
                "data": {**{k: v for k, v in fingerprint.items() if k != "sha256"}, **data.info},
                "init_omega": init_omega}

    def write_views() -> None:
        _write_metrics(output_dir / METRICS, records)
        spec = LossSpec(config.family, config.order, trainer.omega.tolist(), full_provenance())
        save_loss(output_dir / LOSS, spec, overwrite=True)

    if resumed:
        write_views()
    bar = tqdm(total=config.outer_steps, initial=min(trainer.steps_done, config.outer_steps),
               desc="meta-train", unit="step", disable=not progress)
    try:
        while trainer.steps_done < config.outer_steps:
            try:
                record = trainer.outer_step()
            except NonFiniteError as e:
                kept = (f"the last good checkpoint ({output_dir / CHECKPOINT}, step "
                        f"{trainer.steps_done}) is kept" if (output_dir / CHECKPOINT).is_file()
                        else "no checkpoint had been written yet")
                raise NonFiniteError(f"{e}; stopping, {kept}") from e
            records.append(record)
            if record.get("trusted_domains") == 0:
                worst = min(record["per_domain"]["solver_residual"])
                tqdm.write(f"outer step {record['step']}: no domain's solve left a relative residual "
                           f"within max_solver_residual {config.max_solver_residual} (smallest "
                           f"{worst:.3g}); ω unchanged", file=sys.stderr)
            _save_checkpoint(output_dir / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "version": 1, "package_version": __version__,
                "config": config.to_dict(), "data": fingerprint, "init_omega": init_omega,
                "trainer": trainer.state_dict(), "metrics": records})
            write_views()
            discard_replaced(output_dir, replaced, log)
            bar.update(1)
            bar.set_postfix(heldout_acc=f"{record['outer_heldout_acc']:.3f}",
                            source_acc=f"{record['inner_source_acc']:.3f}")
    finally:
        bar.close()
