"""What every command shares: argument types, flag groups, devices, data loading, one error boundary.

Every command's `main` runs its work through `run_command`, which turns what can go wrong into
one line and an exit status. See docs/files.md (exit statuses).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import threading
import traceback
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Set, Tuple

import torch

from ..bridge.domainbed_env import DomainBedNotFound, find_domainbed_root
from ..bridge.patching import PatchError
from ..files.atomic import machine_fault
from ..files.errors import spelled
from ..files.runfolder import RunDirError
from ..files.runlock import FolderLocked
from ..files.running_jobs import JobsStillRunning
from ..meta.data import DomainData, planted_dataset, size_problems, synthetic_dataset
from ..meta.config import InnerSettings
from ..meta.noise import with_label_noise
from ..meta.settings import Rule, leaves, rule_of

# Errors that a user's input or environment causes: one line and exit status 2.
EXPECTED_ERRORS = (ValueError, OSError, RunDirError, FolderLocked, DomainBedNotFound, PatchError)
BUG_REPORT = ("error: this is a bug in domainbed-itl (an unexpected {name}); please report it with "
              "the command and this traceback")
DEVICE_TYPES = ("cpu", "cuda")
DATA_FLAGS = ("dataset", "data_dir", "domainbed_root", "per_domain_cap", "data_seed", "label_noise")
# A data flag's value for a checkpoint of an earlier release, which does not record it.
DATA_FLAG_DEFAULTS = {"label_noise": 0.0}
INT64_LIMIT = 2 ** 63
# Sizes that are caps ("at most"): left at their default, one above the data means every
# example, which is what the default asks, so no note is printed (one given is still checked).
QUIET_CAPS = ("eval_size",)
OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")
# A library option whose flag has another name (the others are --NAME).
FLAG_OF_OPTION = {"sweep_dir": "input_dir"}


# ------------------------------------------------------------------------------ the boundary


def run_command(body: Callable[[], int], *, interrupted: Callable[[], str] = lambda: "stopped",
                expected: Tuple[type, ...] = (), failures: Tuple[type, ...] = ()) -> int:
    """Run a command's `body` (returning its exit status) inside the one error boundary (see the
    module docstring). `interrupted()` says how to continue after Ctrl-C; `expected` and
    `failures` add a command's own exception types (status 2 and 1). SIGTERM is Ctrl-C's twin."""
    try:
        with _sigterm_as_interrupt():
            return body()
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted: {interrupted()}", file=sys.stderr, flush=True)
        return 143 if isinstance(stop, Terminated) else 130
    except (*expected, *EXPECTED_ERRORS) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except (*failures, FloatingPointError, JobsStillRunning) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except OverflowError as error:  # a finite value too large for what it is used in
        print(f"error: a value is too large to compute with ({one_line(error)}); expected values "
              "of a moderate size", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(s in str(error) for s in OUT_OF_MEMORY):
            return _bug(error)
        print(f"error: out of memory ({_first_line(error)}); smaller settings (--hidden, "
              "--batch_size, --inner_steps, --per_domain_cap, ...) need less", file=sys.stderr)
        return 1
    except Exception as error:
        return _bug(error)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it stops as after Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block (in the main thread), SIGTERM raises Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (a library's message may span several), the options it
    names written as flags; an OSError of the machine (a full disk, ...) with the path it
    concerns, where known."""
    if isinstance(error, OSError) and error.strerror and (
            not error.filename or error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        return machine_fault(error)
    text = as_flags(getattr(error, "wording", None) or str(error))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def option_flag(option: str) -> str:
    """The flag that sets a library option (`overwrite` -> --overwrite)."""
    return flag_name(FLAG_OF_OPTION.get(option, option))


def as_flags(text: str) -> str:
    """A library message (files/errors.py) with the options it names written as flags."""
    return spelled(text, option_flag)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _bug(error: Exception) -> int:
    """A bug: its traceback, then the request to report it; status 1."""
    traceback.print_exc()
    print(BUG_REPORT.format(name=type(error).__name__), file=sys.stderr)
    return 1


def command_line(argv: Optional[Sequence[str]], command: str) -> str:
    """The command as typed (`python -m domainbed_itl.scripts.<command> ...`), for provenance."""
    words = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", f"domainbed_itl.scripts.{command}", *words])


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """The destinations of the flags given on the command line `argv` (not left at a default),
    the flags of a sub-command made by a `CommandParser` included.

    `argv` is parsed twice: once as usual, for the destinations; then into a namespace that
    already holds every destination, unset, so that argparse fills in no default and only the
    flags given replace their entry."""
    dests = set(vars(parser.parse_args(argv)))
    token = _PROBED.set(dests)
    try:
        probe = parser.parse_args(argv, _Probe.unset(dests))
    finally:
        _PROBED.reset(token)
    return {dest for dest, value in vars(probe).items() if value is not _UNSET}


_UNSET = object()
# While `explicit_flags` parses: every destination, for the namespaces of sub-commands.
_PROBED: ContextVar[Optional[Set[str]]] = ContextVar("probed_destinations", default=None)


class _Probe(argparse.Namespace):
    """A namespace whose unset entries never replace set ones (a sub-command's namespace is
    copied into its parent's, unset entries included)."""

    @classmethod
    def unset(cls, dests: Set[str]) -> "_Probe":
        return cls(**{dest: _UNSET for dest in dests})

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not _UNSET or getattr(self, name, _UNSET) is _UNSET:
            super().__setattr__(name, value)


# --------------------------------------------------------------------------- a command's parser

# How the running command was invoked, when not as `python -m domainbed_itl.scripts.<command>`
# (the console command `domainbed-itl <command>` sets it).
_INVOKED_AS: ContextVar[Optional[str]] = ContextVar("invoked_as", default=None)


def program(command: str) -> str:
    """The name a command's usage line shows: how it was invoked (`invoked_as`), by default
    `python -m domainbed_itl.scripts.<command>`."""
    return _INVOKED_AS.get() or f"python -m domainbed_itl.scripts.{command}"


@contextlib.contextmanager
def invoked_as(name: str) -> Iterator[None]:
    """Within the block, commands show `name` as their program (e.g. `domainbed-itl meta-train`)."""
    token = _INVOKED_AS.set(name)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


class CommandParser(argparse.ArgumentParser):
    """A command's ArgumentParser: `command` (its module's name) gives its program (`program`),
    and its sub-commands' parsers are CommandParsers too, so `explicit_flags` sees their flags."""

    def __init__(self, command: Optional[str] = None, **kwargs: Any) -> None:
        if command is not None:
            kwargs.setdefault("prog", program(command))
        super().__init__(**kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None):
        """argparse's, except that a sub-command parsed by `explicit_flags` starts unset."""
        probed = _PROBED.get()
        if namespace is None and probed is not None:
            namespace = _Probe.unset(probed)
        return super().parse_known_args(args, namespace)


def command_main(argv: Optional[Sequence[str]], build_parser: Callable[[], argparse.ArgumentParser],
                 run: Callable[[argparse.Namespace], int], *,
                 interrupted: Optional[Callable[[argparse.Namespace], str]] = None,
                 expected: Tuple[type, ...] = (), failures: Tuple[type, ...] = ()) -> int:
    """A command's `main`: parse `argv` (sys.argv's when None) with `build_parser()`, then
    `run(args)` inside the error boundary (`run_command`); `interrupted(args)` says how to
    continue after Ctrl-C. Returns the exit status."""
    args = build_parser().parse_args(argv)
    boundary: Dict[str, Any] = {"expected": expected, "failures": failures}
    if interrupted is not None:
        boundary["interrupted"] = lambda: interrupted(args)
    return run_command(lambda: run(args), **boundary)


# ----------------------------------------------------------------------------- argument types


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type accepting integers >= `minimum` that fit in 64 bits (torch's sizes and
    seeds), written plainly ('3', not '3.0')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is not None and str(value) == text.strip() and not -INT64_LIMIT <= value < INT64_LIMIT:
            raise argparse.ArgumentTypeError(f"expected {expected} that fits in 64 bits, got {text!r}")
        if value is None or value < minimum or str(value) != text.strip():
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


integer = int_at_least(-INT64_LIMIT, "an integer")
positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "an integer >= 0")


class Distinct(argparse.Action):
    """A list flag whose values are a set (seeds, losses, domains, ...): a repeated value is
    refused in one line, as it would be counted twice as if it were independent."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        seen: list = []
        for value in values:
            if value in seen:
                parser.error(f"{option_string or self.dest} gives {value!r} twice; expected "
                             "distinct values (each is a separate run or row)")
            seen.append(value)
        setattr(namespace, self.dest, list(values))


def file_name(text: str) -> str:
    """An output name: a file or folder name, not a path (no separator, not '.' or '..')."""
    if (not text or text in (".", "..") or any(c in text for c in "/\\\0")
            or (os.altsep and os.altsep in text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name; expected a file name without "
                                         "folders (no '/', '\\', '.' or '..')")
    return text


def positive_float(text: str) -> float:
    """An argparse type accepting finite numbers > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type accepting finite numbers >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def rate(text: str) -> float:
    """An argparse type accepting numbers in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def widths(text: str) -> Tuple[int, ...]:
    """An argparse type for hidden widths: comma-separated positive integers ('512,256')."""
    try:
        return tuple(positive_int(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive hidden widths such as 256 or 512,256, got {text!r}"
        ) from None


def flag_name(setting: str) -> str:
    """The flag of a setting, as a command line writes it."""
    return f"--{setting}"


def flag_text(name: str, value: Any) -> str:
    """How the flag `name` with `value` is written on a command line."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, (tuple, list)):
        return f"--{name} {','.join(map(str, value))}"
    return f"--{name} {value}"


# ------------------------------------------------------------------------------- flag groups

# A flag table: flag name (= destination) -> argparse keywords. A command adds a table as one
# group (`add_flags`); a flag added to a table reaches every command that takes the table.


def flag_keywords(rule: Rule) -> Dict[str, Any]:
    """The argparse keywords that read a setting of `rule` from the command line (the setting's
    own rule checks the value once it is set)."""
    if rule.kind == "choice" and rule.registry is not None:  # checked by the rule, once set
        return dict(metavar=(rule.label or "name").upper().replace(" ", "_"))
    if rule.kind == "choice":
        return dict(choices=rule.choices)
    if rule.kind == "bool":
        return dict(action=argparse.BooleanOptionalAction)
    if rule.kind == "widths":
        return dict(type=widths)
    if rule.kind == "int":
        return dict(type={1: positive_int, 0: nonnegative_int}.get(
            rule.low, int_at_least(int(rule.low), f"an integer >= {rule.low}")))
    if rule.low == 0:
        return dict(type=positive_float if rule.low_open else nonnegative_float)
    return dict(type=float)


def setting_flags(kind: type, only: Sequence[str] = (), skip: Sequence[str] = ()
                  ) -> Dict[str, Dict[str, Any]]:
    """A flag table of the settings of the Settings class `kind` (parts' settings included):
    every one, or those named in `only`, less `skip`; each flag's type, choices and help come
    from its field (meta.settings)."""
    return {f.name: {**flag_keywords(rule_of(f)), **({"help": f.metadata["help"]}
                                                     if f.metadata["help"] else {})}
            for f in leaves(kind) if (not only or f.name in only) and f.name not in skip}


# How one inner network is trained: every InnerSettings setting but the step count, so
# meta_train, cma_search, evaluate_loss meta and grid_search take these flags (None: the
# preset's or the protocol's default).
INNER_TRAINING = setting_flags(InnerSettings, skip=("inner_steps",))


def add_flags(parser: argparse.ArgumentParser, title: str, *tables: Mapping[str, Dict[str, Any]],
              **defaults: Any) -> argparse._ArgumentGroup:
    """The flags of `tables` as the argument group `title` (returned); `defaults` replace their
    default None (the meaning of an absent flag) where a command has a fixed default."""
    group = parser.add_argument_group(title)
    for table in tables:
        for name, keywords in table.items():
            group.add_argument(f"--{name}", **{"default": defaults.get(name), **keywords})
    return group


def add_data_flags(parser: argparse.ArgumentParser, synthetic: bool = True,
                   sampling: bool = True) -> None:
    """--dataset (with `synthetic`, also 'synthetic'), --data_dir, --domainbed_root; with
    `sampling`, --per_domain_cap and --data_seed."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="RotatedMNIST",
                      help="a DomainBed dataset name" + (", or 'synthetic' or 'planted' (built "
                                                         "in, docs/meta_learning.md)"
                                                         if synthetic else "")
                           + " (default RotatedMNIST)")
    data.add_argument("--data_dir", default=None,
                      help="DomainBed's --data_dir" + (" (needed for every dataset but the built-in ones)"
                                                       if synthetic else ""))
    data.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                      help="DomainBed checkout, taken from $DOMAINBED_ROOT when that is set; "
                           "without one, `import domainbed` must work")
    if sampling:
        data.add_argument("--per_domain_cap", type=positive_int, default=None,
                          help="use at most this many examples of each domain")
        data.add_argument("--data_seed", type=nonnegative_int, default=0,
                          help="seed of DomainBed's data construction and of the cap's choice")
        add_label_noise_flag(data)


def add_label_noise_flag(group: argparse._ActionsContainer) -> None:
    """--label_noise RATE: symmetric noise on the source domains' training labels."""
    group.add_argument("--label_noise", type=rate, default=0.0, metavar="RATE",
                       help="make this fraction of every domain's training labels wrong, each "
                            "redrawn among the other classes (seeded by --data_seed); a held-out "
                            "domain is judged on its clean labels (default 0)")


def add_trained_run_flags(parser: argparse.ArgumentParser) -> None:
    """The inputs, data, device and output flags of every analysis of trained DomainBed models."""
    parser.add_argument("inputs", nargs="+",
                        help="DomainBed run folders, sweep folders (searched for runs) or model .pkl "
                             "files; a .pkl is a pickle written by DomainBed, read with "
                             "torch.load(weights_only=True): tensors and plain values only, "
                             "anything else is refused; give only runs you trust")
    parser.add_argument("--data_dir", default=None,
                        help="DomainBed's --data_dir (default: each run's own)")
    parser.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                        help="DomainBed checkout (default: $DOMAINBED_ROOT, else `import domainbed`)")
    parser.add_argument("--algorithms", nargs="+", action=Distinct, default=None,
                        help="only runs of these algorithms (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="evaluation batch size")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def trained_models(args: argparse.Namespace) -> Iterator[tuple]:
    """(run, model, splits) of the runs the flags of `add_trained_run_flags` select."""
    from ..bridge.trained_models import find_runs, selected_models

    parse_device(args.device)
    return selected_models(find_runs(args.inputs), args.algorithms, args.domainbed_root,
                           args.device, args.data_dir)


def add_output_flags(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """--output_dir, --overwrite, --no_progress and (with `resume`) --resume."""
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    if resume:
        out.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    out.add_argument("--overwrite", action="store_true", help="start again in --output_dir")
    out.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_device_flag(group: argparse._ActionsContainer) -> None:
    """--device: cpu (the default), cuda or cuda:N."""
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; a "
                                                       "resumed run: the device type it ran on)")


# ----------------------------------------------------------------------- devices and data


def parse_device(text: str) -> torch.device:
    """The device `text` names: cpu, cuda or cuda:N present on this machine; ValueError else."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {text}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine")
    count = torch.cuda.device_count() if device.type == "cuda" else 1
    if device.index is not None and device.index >= count and device.type == "cuda":
        raise ValueError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to "
                         f"cuda:{count - 1}")
    return device


# --dataset names built into the package: (maker, examples per domain without --per_domain_cap).
BUILT_IN_DATASETS = {"synthetic": (synthetic_dataset, 500), "planted": (planted_dataset, 200)}


def data_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The data flags' values (see `add_data_flags`), as `load_data` and provenance take them."""
    return {name: getattr(args, name, DATA_FLAG_DEFAULTS.get(name)) for name in DATA_FLAGS}


def check_data_flags(flags: Mapping[str, Any]) -> None:
    """Raise ValueError or DomainBedNotFound for data flags that cannot load (cheap checks only)."""
    if flags["dataset"] in BUILT_IN_DATASETS:
        return
    if flags["data_dir"] is None:
        raise ValueError(f"--dataset {flags['dataset']} needs --data_dir, the folder DomainBed "
                         "reads its data from")
    if not os.path.isdir(flags["data_dir"]):
        raise ValueError(f"--data_dir {flags['data_dir']!r} is not a folder")
    find_domainbed_root(flags["domainbed_root"])


def check_data_sizes(data: DomainData, wanted: Mapping[str, Optional[int]],
                     explicit: Set[str]) -> None:
    """Refuse sizes given on the command line that `data` cannot hold (ValueError naming them);
    a note on stderr for defaults that exceed it (meta.data.size_problems), but for QUIET_CAPS."""
    sizes = [len(y) for _, y in data.domains]
    wanted = {**{k: v for k, v in wanted.items() if k in explicit or k not in QUIET_CAPS},
              "per_domain_cap": data.info.get("per_domain_cap")}
    for note in size_problems(sizes, wanted, explicit, data.name, spell=flag_name):
        print(f"note: {note}", file=sys.stderr)


def load_data(flags: Mapping[str, Any]) -> DomainData:
    """The per-domain tensors the data flags name: a built-in data set (synthetic domains, the
    planted task), or DomainBed's dataset; with label_noise, that fraction of every domain's
    training labels made wrong (meta.noise.with_label_noise, seeded by data_seed), the held-out
    labels clean."""
    if flags["dataset"] in BUILT_IN_DATASETS:
        make, per_domain = BUILT_IN_DATASETS[flags["dataset"]]
        data = make(per_domain=flags["per_domain_cap"] or per_domain, seed=flags["data_seed"])
    else:
        check_data_flags(flags)
        from ..bridge.domainbed_data import load_domainbed_domains
        data = load_domainbed_domains(flags["dataset"], flags["data_dir"], flags["domainbed_root"],
                                      flags["per_domain_cap"], flags["data_seed"])
    noise = flags.get("label_noise") or 0.0
    return with_label_noise(data, noise, seed=flags["data_seed"] or 0) if noise else data
