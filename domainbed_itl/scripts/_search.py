"""What the loss-search commands (meta_train, cma_search) share: their MetaConfig flags, the loss
family and --init, and a run's settings, from the flags for a new run and from the checkpoint
for a resume. See docs/meta_learning.md#what-a-run-writes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from ..files.runfolder import RunDirError, RunFolder, RunKind, open_run_folder, resume_hint
from ..losses.lossfile import LossFileError, LossSpec, resolve_loss
from ..losses.families import family_names, family_orders, family_spellings, split_spelling
from ..meta.data import DomainData
from ..meta.config import (META_PRESETS, DiagnosticsSettings, InnerSettings, MetaConfig,
                           OuterSettings, SolverSettings, preset_config)
from ..meta.resume import initial_loss, saved_config
from ._cli import (DATA_FLAG_DEFAULTS, check_data_flags, check_data_sizes, command_line, data_flags,
                   explicit_flags, flag_text, integer, load_data, option_flag, parse_device, run_command,
                   setting_flags)

DEFAULT_PRESET = "paper_guarded"
# Data flags a resume may change: where the same data and DomainBed are.
LOCATION_FLAGS = ("data_dir", "domainbed_root")

# MetaConfig settings as flags, one table per group (see _cli.add_flags), derived from the
# settings tree; an absent flag (None) leaves the preset's value. A setting added to a part
# reaches every command that takes the part's table.
OUTER = setting_flags(OuterSettings, skip=("warm_start", "outer_batch", "objective"))
# What M is, and how it and the logged source accuracy are measured.
OBJECTIVE = setting_flags(MetaConfig, only=("objective", "outer_batch", "eval_size"))
INNER_STEPS = setting_flags(InnerSettings, only=("inner_steps",))
WARM_START = setting_flags(OuterSettings, only=("warm_start",))
HYPERGRADIENT = setting_flags(SolverSettings)
DIAGNOSTICS = setting_flags(DiagnosticsSettings)
BATCHED = setting_flags(MetaConfig, only=("batched",))
SEED = setting_flags(MetaConfig, only=("seed",))


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """--preset and the loss flags (--family, --order, --init)."""
    parser.add_argument("--preset", choices=tuple(META_PRESETS), default=DEFAULT_PRESET,
                        help=f"named settings (default {DEFAULT_PRESET}); explicit flags override them")
    try:
        names, spellings = family_names(), family_spellings()
    except ValueError as error:  # a module named in DOMAINBED_ITL_FAMILIES does not import
        parser.error(str(error))
    ordered = [n for n in names if family_orders(n) is not None]
    loss = parser.add_argument_group("loss")
    loss.add_argument("--family", choices=spellings, default=None, metavar="FAMILY",
                      help=f"a registered loss family: {', '.join(names)}; those with orders "
                           f"({', '.join(ordered)}) need --order or carry it in their name "
                           "(taylor4 is taylor with --order 4, poly1 is Poly-1); default: the "
                           "--init file's family, else the preset's")
    loss.add_argument("--order", type=integer, default=None,
                      help=f"the order of a family with orders ({', '.join(ordered)})")
    loss.add_argument("--init", default=None,
                      help="start from this loss file or preset loss (e.g. ITL); default: the "
                           "family's default, for Taylor losses the Taylor expansion of "
                           "cross-entropy")


@dataclass
class SearchSettings:
    """A search run's settings: configuration, initial loss, data flags, device, provenance."""

    config: MetaConfig
    init: Optional[LossSpec]
    data: Dict[str, Any]
    device: torch.device
    provenance: Dict[str, Any]


def family_of(args: argparse.Namespace, init: Optional[LossSpec]) -> Optional[Tuple[str, Optional[int]]]:
    """(family, order) from --family/--order, checked against the --init loss; None if neither
    says (the preset's family then applies)."""
    if args.family is None:
        if args.order is not None:
            raise ValueError(f"--order {args.order} needs a --family with orders, such as taylor")
        return (init.family, init.order) if init is not None else None
    name, order = split_spelling(args.family)
    orders = family_orders(name)
    if order is not None:  # written with its order, e.g. taylor4
        if args.order is not None and args.order != order:
            raise ValueError(f"--family {args.family} conflicts with --order {args.order}")
    elif orders is not None:
        if args.order is None:
            raise ValueError(f"--family {name} needs --order in [{orders[0]}, {orders[-1]}] "
                             f"(or use --family {name}{orders[0]}..{name}{orders[-1]})")
        order = args.order
    elif args.order is not None:
        raise ValueError(f"--family {args.family} takes no --order, got --order {args.order}")
    family = (name, order)
    if init is not None and (init.family, init.order) != family:
        raise ValueError(f"--init {args.init} holds a {init.family} loss of order {init.order}, "
                         f"but --family asks for {family[0]} of order {family[1]}")
    return family


def new_settings(args: argparse.Namespace, flags: Sequence[str], command: str) -> SearchSettings:
    """A new run's settings: --init, then --preset's MetaConfig with the `flags` that were set
    and the loss family. Raises ValueError or LossFileError naming a bad value."""
    init = None if args.init is None else resolve_loss(args.init)
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    family = family_of(args, init)
    if family is not None:
        overrides["family"], overrides["order"] = family
    data = data_flags(args)
    return SearchSettings(preset_config(args.preset, overrides), init, data,
                          parse_device(args.device),
                          {"preset": args.preset, "init": args.init, "data_flags": data,
                           "command": command})


def refuse_contradictions(path: Path, contradictions: List[Tuple[str, str]]) -> None:
    """RunDirError listing every (flag as given, the checkpoint's value) that disagree."""
    if contradictions:
        raise RunDirError(f"cannot resume {path}: " + "; ".join(
            f"{given} contradicts the checkpoint's {saved}" for given, saved in contradictions))


def value_text(value: Any) -> str:
    """A setting's value as a message shows it (widths as on the command line)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _config_contradictions(args: argparse.Namespace, explicit: Set[str], flags: Sequence[str],
                           saved: Mapping[str, Any], may_grow: Sequence[str]) -> List[Tuple[str, str]]:
    found = [(flag_text(k, getattr(args, k)), f"{k} {value_text(saved[k])}") for k in flags
             if k in explicit and k not in may_grow and getattr(args, k) != saved[k]]
    if explicit & {"family", "order"}:
        family = family_of(args, None)
        if family != (saved["family"], saved["order"]):
            given = " ".join(f"--{k} {getattr(args, k)}" for k in ("family", "order")
                             if getattr(args, k) is not None)
            found.append((given, f"family {saved['family']} (order {saved['order']})"))
    return found


def _init_contradiction(args: argparse.Namespace, saved: LossSpec,
                        named: Optional[str]) -> List[Tuple[str, str]]:
    """--init given on a resume: the same loss as the checkpoint's start, or the same name when
    the file is gone (the checkpoint keeps its copy)."""
    what = f"initial loss ({named or 'the family default'})"
    try:
        given = resolve_loss(args.init)
    except LossFileError:
        if args.init == named:
            return []
        raise
    same = ((given.family, given.order) == (saved.family, saved.order) and
            torch.tensor(given.parameters, dtype=torch.float32).tolist() == saved.parameters)
    return [] if same else [(f"--init {args.init}", what)]


def resumed_settings(args: argparse.Namespace, explicit: Set[str], flags: Sequence[str],
                     ckpt: Mapping[str, Any], config_key: str, path: Path, command: str,
                     may_grow: Sequence[str] = ("outer_steps",)) -> SearchSettings:
    """A resume's settings: the checkpoint's, where the explicit flags agree with them (see the
    module docstring); RunDirError naming every contradiction."""
    saved = saved_config(ckpt, config_key)
    provenance = ckpt.get("provenance") or {}
    init = initial_loss(ckpt, config_key)
    found = _config_contradictions(args, explicit, flags, saved, may_grow)
    if "preset" in explicit and provenance.get("preset", args.preset) != args.preset:
        found.append((f"--preset {args.preset}", f"preset {provenance['preset']}"))
    if "init" in explicit:
        found += _init_contradiction(args, init, provenance.get("init"))
    data = {**DATA_FLAG_DEFAULTS, **(provenance.get("data_flags") or data_flags(args))}
    if not set(data_flags(args)) <= set(data):  # a damaged checkpoint's
        raise RunDirError(f"cannot resume {path}: its provenance.data_flags lacks "
                          f"{', '.join(sorted(set(data_flags(args)) - set(data)))}")
    found += [(flag_text(k, getattr(args, k)), f"{k} {data[k]}") for k in data
              if k in explicit and k not in LOCATION_FLAGS and getattr(args, k) != data[k]]
    refuse_contradictions(path, found)
    data.update({k: getattr(args, k) for k in LOCATION_FLAGS if k in explicit})
    config = MetaConfig(**{**saved, **{k: getattr(args, k) for k in may_grow if k in explicit}})
    return SearchSettings(config, init, data, _resumed_device(args, explicit, ckpt, path),
                          {"preset": provenance.get("preset", args.preset),
                           "init": provenance.get("init", args.init), "data_flags": data,
                           "command": command})


def _resumed_device(args: argparse.Namespace, explicit: Set[str], ckpt: Mapping[str, Any],
                    path: Path) -> torch.device:
    """--device if given (the run folder checks its type), else the checkpoint's device type."""
    saved = ckpt.get("device")
    if "device" in explicit or saved is None:  # a version 1 checkpoint holds none: the flag
        return parse_device(args.device)
    try:
        return parse_device(saved)
    except ValueError as error:
        raise RunDirError(f"cannot resume {path} here: it ran on {saved} ({error})") from None


def search_main(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], name: str,
                kind: RunKind, flags: Sequence[str], config_key: str, may_grow: Sequence[str],
                work: Callable[[argparse.Namespace, Set[str], RunFolder, SearchSettings, DomainData], int],
                check: Optional[Callable[[MetaConfig], None]] = None) -> int:
    """A search command: its flags read into settings, its run folder opened once (a resume's
    settings then come from the checkpoint), the data loaded, then `work`, all inside the error
    boundary. Flag values that cannot make a new run (or that `check` refuses, raising
    ValueError) are argparse errors."""
    args = parser.parse_args(argv)
    explicit, command = explicit_flags(parser, argv), command_line(argv, name)
    try:
        settings = None if args.resume else new_settings(args, flags, command)
        if settings is not None and check is not None:
            check(settings.config)
    except ValueError as error:  # LossFileError among them
        parser.error(str(error))

    def body() -> int:
        if settings is not None:
            check_data_flags(settings.data)  # before the folder is made
        with open_run_folder(args.output_dir, kind, resume=args.resume, overwrite=args.overwrite,
                             command=command, must_resume=args.resume) as folder:
            run = settings
            if run is None:  # --resume: the folder holds a checkpoint
                run = resumed_settings(args, explicit, flags, folder.checkpoint, config_key,
                                       folder.checkpoint_path, command, may_grow)
            data = load_data(run.data)  # slow: once the folder is checked and locked
            check_data_sizes(data, {k: getattr(run.config, k) for k in flags}, explicit)
            return work(args, explicit, folder, run, data)

    return run_command(body, interrupted=lambda: resume_hint(args.output_dir, option_flag))
