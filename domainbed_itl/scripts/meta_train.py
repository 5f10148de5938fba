"""Meta-learn a loss on a DomainBed dataset by implicit gradients (Algorithm 1).

    python -m domainbed_itl.scripts.meta_train --dataset RotatedMNIST --data_dir ./data \\
        --domainbed_root ../DomainBed --output_dir runs/meta

writes runs/meta/loss.json (the learned loss, usable as --hparams '{"itl_loss": ".../loss.json"}'),
metrics.jsonl (one line per outer step) and checkpoint.pt (after every step; --resume continues).
`--dataset synthetic` uses built-in Gaussian domains instead of DomainBed (smoke tests, benchmarks).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from typing import Optional, Sequence, Tuple

import torch

from ..bridge.domainbed_env import DomainBedNotFound, find_domainbed_root
from ..losses.lossfile import LossFileError, LossSpec, resolve_loss
from ..losses.taylor import MAX_ORDER, MIN_ORDER
from ..meta.aggregators import AGGREGATORS, REDUCTIONS
from ..meta.data import DomainData, synthetic_domains
from ..meta.inner import INNER_OPTIMIZERS, SCHEDULES
from ..meta.config import GUESSES, META_PRESETS, NEUMANN_FORMS, OUTER_OPTIMIZERS, MetaConfig, preset_config
from ..meta.runner import LOSS, RunDirError, check_output_dir, run_meta_training
from ..meta.trainer import NonFiniteError
from ..files.runlock import FolderLocked, folder_lock

DEFAULT_PRESET = "paper_guarded"

FAMILY_CHOICES = tuple(f"taylor{k}" for k in range(MIN_ORDER, MAX_ORDER + 1)) + ("taylor", "sce")


def _int_at_least(minimum: int, expected: str):
    """An argparse type accepting integers >= `minimum`, written plainly ('3', not '3.0')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or str(value) != text.strip():
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_convergence_flags(group: argparse._ArgumentGroup) -> None:
    """The inner-training flags that bring networks to a stationary point (meta_train,
    cma_search and evaluate_loss meta share them)."""
    group.add_argument("--inner_schedule", choices=SCHEDULES,
                       help="learning rate over the inner steps: constant, or annealed to 0 "
                            "over them (cosine, linear)")
    group.add_argument("--inner_weight_decay", type=_nonnegative_float,
                       help="λ of an L2 term λ/2‖θ‖² in the inner objective (also in the "
                            "implicit gradient)")
    group.add_argument("--inner_stop_ratio", type=_positive_float,
                       help="stop a network once its gradient norm on the source-evaluation "
                            "examples is at most this fraction (0 to 1) of its start; "
                            "--inner_steps is then the cap")
    group.add_argument("--inner_stop_every", type=_positive_int,
                       help="check the stopping rule every this many inner steps")


def _widths(text: str) -> Tuple[int, ...]:
    try:
        return tuple(_positive_int(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive hidden widths such as 256 or 512,256, got {text!r}"
        ) from None


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The data flags meta_train and cma_search share."""
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="RotatedMNIST",
                      help="a DomainBed dataset name, or 'synthetic' (default RotatedMNIST)")
    data.add_argument("--data_dir", default=None,
                      help="DomainBed's --data_dir (needed for every dataset but 'synthetic')")
    data.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                      help="DomainBed checkout, taken from $DOMAINBED_ROOT when that is set; "
                           "without one, `import domainbed` must work")
    data.add_argument("--per_domain_cap", type=_positive_int, default=None,
                      help="use at most this many examples of each domain")
    data.add_argument("--data_seed", type=_nonnegative_int, default=0,
                      help="seed of DomainBed's data construction and of the cap's choice")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """The run-folder flags meta_train and cma_search share."""
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    out.add_argument("--overwrite", action="store_true", help="start again in --output_dir")
    out.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_loss_flags(p: argparse.ArgumentParser) -> None:
    """The loss-family flags meta_train and cma_search share."""
    loss = p.add_argument_group("loss")
    loss.add_argument("--family", choices=FAMILY_CHOICES, default=None, metavar="FAMILY",
                      help=f"one of {', '.join(FAMILY_CHOICES)} (taylor needs --order); default: "
                           "the --init file's family, else the preset's")
    loss.add_argument("--order", type=int, default=None, help="Taylor order with --family taylor")
    loss.add_argument("--init", default=None,
                      help="start from this loss file or preset loss (e.g. ITL); default: the "
                           "family's default, for Taylor losses the Taylor expansion of "
                           "cross-entropy")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface. Settings left out come from --preset, then MetaConfig."""
    p = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.meta_train",
                                description=__doc__.split("\n\n")[0], epilog=_presets_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(META_PRESETS), default=DEFAULT_PRESET,
                   help=f"named settings (default {DEFAULT_PRESET}); explicit flags override them")
    add_data_flags(p)
    add_output_flags(p)
    add_loss_flags(p)
    outer = p.add_argument_group("outer loop (Algorithm 1)")
    outer.add_argument("--outer_steps", type=_positive_int)
    outer.add_argument("--outer_optimizer", choices=OUTER_OPTIMIZERS,
                       help="sgd is Algorithm 1's plain gradient descent")
    outer.add_argument("--outer_lr", type=_positive_float)
    outer.add_argument("--aggregate", choices=tuple(AGGREGATORS))
    outer.add_argument("--aggregate_reduction", choices=REDUCTIONS,
                       help="sum the per-domain hypergradients (Yu et al.'s PCGrad, the paper) "
                            "or average them")
    outer.add_argument("--outer_batch", type=_positive_int,
                       help="held-out examples for M per domain (default: the whole domain)")
    outer.add_argument("--eval_size", type=_positive_int,
                       help="source examples for the logged inner source accuracy and gradient norm")
    inner = p.add_argument_group("inner loop")
    inner.add_argument("--inner_steps", type=_positive_int)
    inner.add_argument("--inner_optimizer", choices=INNER_OPTIMIZERS)
    inner.add_argument("--inner_lr", type=_positive_float)
    inner.add_argument("--inner_momentum", type=float, help="with --inner_optimizer momentum")
    inner.add_argument("--warm_start", action=argparse.BooleanOptionalAction,
                       help="continue training the previous outer step's inner networks instead "
                            "of fresh ones (online IFT)")
    inner.add_argument("--batch_size", type=_positive_int)
    inner.add_argument("--hidden", type=_widths,
                       help="hidden widths of the base MLP, e.g. 256 (two weight layers)")
    add_convergence_flags(inner)
    hyper = p.add_argument_group("implicit gradient (Algorithm 2)")
    hyper.add_argument("--solver", choices=("neumann", "cg"))
    hyper.add_argument("--neumann_steps", type=_positive_int)
    hyper.add_argument("--neumann_alpha", type=_positive_float)
    hyper.add_argument("--neumann_form", choices=NEUMANN_FORMS,
                       help="inverse: α Σ (I-αH)^j v, an estimate of H^-1 v; algorithm2: the sum "
                            "without α, as Algorithm 2 is printed")
    hyper.add_argument("--neumann_power_iters", type=_nonnegative_int,
                       help="if > 0: α = neumann_alpha/λ̂_max per domain, λ̂_max from this many "
                            "power iterations (needs --neumann_form inverse, --neumann_alpha < 2)")
    hyper.add_argument("--neumann_early_stop", action=argparse.BooleanOptionalAction,
                       help="return the Neumann partial sum of smallest residual")
    hyper.add_argument("--solver_damping", type=_nonnegative_float,
                       help="solve (H + μI)u = -v with this μ (ridge damping)")
    hyper.add_argument("--cg_maxiter", type=_positive_int)
    hyper.add_argument("--cg_tol", type=float)
    hyper.add_argument("--hvp_batch", type=_positive_int,
                       help="source examples in the Hessian-vector products")
    hyper.add_argument("--max_solver_residual", type=_positive_float,
                       help="leave out of the update every domain whose linear solve has a "
                            "larger relative residual (1: worse than no solve, as a diverging "
                            "Neumann series); no update when none is left")
    diag = p.add_argument_group("diagnostics")
    diag.add_argument("--reference_every", type=_nonnegative_int,
                      help="every K outer steps, compare one domain's hypergradient with a long "
                           "MINRES solve (0: never)")
    diag.add_argument("--reference_maxiter", type=_positive_int,
                      help="MINRES iterations of that reference solve")
    diag.add_argument("--spectrum_iters", type=_nonnegative_int,
                      help="record each domain's Hessian λ_max and λ_min from this many power "
                           "iterations each (0: not recorded)")
    run = p.add_argument_group("execution")
    run.add_argument("--batched", action=argparse.BooleanOptionalAction,
                     help="train the per-domain inner networks as one stack and vmap their "
                          "hypergradients")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--seed", type=_nonnegative_int)
    return p


CONVERGENCE_FLAGS = ("inner_schedule", "inner_weight_decay", "inner_stop_ratio", "inner_stop_every")
CONFIG_FLAGS = ("outer_steps", "outer_optimizer", "outer_lr", "aggregate", "aggregate_reduction",
                "outer_batch", "eval_size", "inner_steps", "inner_optimizer", "inner_lr",
                "inner_momentum", "warm_start", "batch_size", "hidden", *CONVERGENCE_FLAGS, "solver",
                "neumann_steps", "neumann_alpha", "neumann_form", "neumann_power_iters",
                "neumann_early_stop", "solver_damping", "cg_maxiter", "cg_tol", "hvp_batch",
                "max_solver_residual", "reference_every", "reference_maxiter", "spectrum_iters",
                "batched", "seed")


def _presets_help() -> str:
    lines = ["presets (values that differ from MetaConfig's defaults):"]
    defaults = MetaConfig().to_dict()
    for name, values in META_PRESETS.items():
        changed = ", ".join(f"{k}={v}" for k, v in values.items() if defaults.get(k) != v)
        lines.append(f"  {name}: {changed}")
        lines += [f"    guessed: {k}: {why}" for k, why in GUESSES.get(name, {}).items()]
    defaults_text = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return "\n".join(lines + ["MetaConfig defaults: " + defaults_text])


def _family(args: argparse.Namespace,
            init: Optional[LossSpec]) -> Optional[Tuple[str, Optional[int]]]:
    """(family, order) from --family/--order, checked against the --init loss; None if neither
    says (the preset's family then applies)."""
    if args.family is None:
        if args.order is not None:
            raise ValueError(f"--order {args.order} needs --family taylor")
        return (init.family, init.order) if init is not None else None
    if args.family.startswith("taylor") and args.family != "taylor":
        order = int(args.family[len("taylor"):])
        if args.order is not None and args.order != order:
            raise ValueError(f"--family {args.family} conflicts with --order {args.order}")
        family = ("taylor", order)
    elif args.family == "taylor":
        if args.order is None:
            raise ValueError(f"--family taylor needs --order in [{MIN_ORDER}, {MAX_ORDER}] "
                             f"(or use --family taylor{MIN_ORDER}..taylor{MAX_ORDER})")
        family = ("taylor", args.order)
    else:
        if args.order is not None:
            raise ValueError(f"--family {args.family} takes no --order, got --order {args.order}")
        family = (args.family, None)
    if init is not None and (init.family, init.order) != family:
        raise ValueError(f"--init {args.init} holds a {init.family} loss of order {init.order}, "
                         f"but --family asks for {family[0]} of order {family[1]}")
    return family


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; expected e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine")
    return device


def _check_data_args(args: argparse.Namespace) -> None:
    """Raise ValueError or DomainBedNotFound for data flags that cannot load (cheap checks only)."""
    if args.dataset == "synthetic":
        return
    if args.data_dir is None:
        raise ValueError(f"--dataset {args.dataset} needs --data_dir, the folder DomainBed reads "
                         "its data from")
    if not os.path.isdir(args.data_dir):
        raise ValueError(f"--data_dir {args.data_dir!r} is not a folder")
    find_domainbed_root(args.domainbed_root)


def _load_data(args: argparse.Namespace) -> DomainData:
    if args.dataset == "synthetic":
        return synthetic_domains(per_domain=args.per_domain_cap or 500, seed=args.data_seed)
    _check_data_args(args)
    from ..bridge.domainbed_data import load_domainbed_domains
    return load_domainbed_domains(args.dataset, args.data_dir, args.domainbed_root,
                                  args.per_domain_cap, args.data_seed)


def _command_line(argv: Optional[Sequence[str]], command: str = "meta_train") -> str:
    """The command as typed, for the loss file's provenance."""
    words = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", f"domainbed_itl.scripts.{command}", *words])


def _meta_config(args: argparse.Namespace, flags: Sequence[str]) -> Tuple[Optional[LossSpec], MetaConfig]:
    """The --init loss and the MetaConfig of --preset with the given `flags` that were set, and
    the loss family (as meta_train and cma_search read them). Raises ValueError, LossFileError."""
    init = None if args.init is None else resolve_loss(args.init)
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    family = _family(args, init)
    if family is not None:
        overrides["family"], overrides["order"] = family
    return init, preset_config(args.preset, overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 done, 1 non-finite stop, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        init, config = _meta_config(args, CONFIG_FLAGS)
        device = _device(args.device)
    except (ValueError, LossFileError) as e:
        parser.error(str(e))
    command = _command_line(argv)
    try:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        _check_data_args(args)
        with folder_lock(args.output_dir, command=command):  # before the (slow) data loading
            data = _load_data(args)
            trainer = run_meta_training(data, config, args.output_dir, init=init,
                                        resume=args.resume, overwrite=args.overwrite,
                                        device=device, progress=not args.no_progress,
                                        provenance={"preset": args.preset, "init": args.init,
                                                    "command": command})
    except (RunDirError, FolderLocked, DomainBedNotFound, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"meta-training done: {trainer.steps_done} outer steps; learned loss in "
          f"{os.path.join(args.output_dir, LOSS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
