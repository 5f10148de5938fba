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
import sys
from typing import Optional, Sequence, Tuple

import torch

from ..domainbed_env import DomainBedNotFound
from ..losses.lossfile import LossFileError, LossSpec, resolve_loss
from ..losses.taylor import MAX_ORDER, MIN_ORDER
from ..meta.data import DomainData, synthetic_domains
from ..meta.runner import LOSS, RunDirError, check_output_dir, run_meta_training
from ..meta.trainer import OUTER_OPTIMIZERS, MetaConfig, NonFiniteError

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


def _widths(text: str) -> Tuple[int, ...]:
    try:
        return tuple(_positive_int(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive hidden widths such as 256 or 512,256, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.meta_train",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = MetaConfig()
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="RotatedMNIST",
                      help="a DomainBed dataset name, or 'synthetic'")
    data.add_argument("--data_dir", default="./data", help="DomainBed's --data_dir")
    data.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                      help="DomainBed checkout, taken from $DOMAINBED_ROOT when that is set; "
                           "without one, `import domainbed` must work")
    data.add_argument("--per_domain_cap", type=_positive_int, default=None,
                      help="use at most this many examples of each domain")
    data.add_argument("--data_seed", type=_nonnegative_int, default=0,
                      help="seed of DomainBed's data construction and of the cap's choice")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    out.add_argument("--overwrite", action="store_true", help="start again in --output_dir")
    out.add_argument("--no_progress", action="store_true", help="no progress bar")
    loss = p.add_argument_group("loss")
    loss.add_argument("--family", choices=FAMILY_CHOICES, default=None, metavar="FAMILY",
                      help=f"one of {', '.join(FAMILY_CHOICES)} (taylor needs --order); default "
                           "taylor4, or the --init file's family")
    loss.add_argument("--order", type=int, default=None, help="Taylor order with --family taylor")
    loss.add_argument("--init", default=None,
                      help="start from this loss file (or preset, e.g. ITL); default: the family's "
                           "default, for Taylor losses the Taylor expansion of cross-entropy")
    outer = p.add_argument_group("outer loop (Algorithm 1)")
    outer.add_argument("--outer_steps", type=_positive_int, default=d.outer_steps)
    outer.add_argument("--outer_optimizer", choices=OUTER_OPTIMIZERS, default=d.outer_optimizer,
                       help="sgd is Algorithm 1's plain gradient descent")
    outer.add_argument("--outer_lr", type=_positive_float, default=d.outer_lr)
    outer.add_argument("--aggregate", choices=("pcgrad", "mean"), default=d.aggregate)
    outer.add_argument("--outer_batch", type=_positive_int, default=d.outer_batch,
                       help="held-out examples for M per domain (default: the whole domain)")
    outer.add_argument("--eval_size", type=_positive_int, default=d.eval_size,
                       help="source examples for the logged inner source accuracy")
    inner = p.add_argument_group("inner loop")
    inner.add_argument("--inner_steps", type=_positive_int, default=d.inner_steps)
    inner.add_argument("--inner_lr", type=_positive_float, default=d.inner_lr)
    inner.add_argument("--batch_size", type=_positive_int, default=d.batch_size)
    inner.add_argument("--hidden", type=_widths, default=d.hidden,
                       help="hidden widths of the base MLP, e.g. 256 (two weight layers)")
    hyper = p.add_argument_group("implicit gradient (Algorithm 2)")
    hyper.add_argument("--solver", choices=("neumann", "cg"), default=d.solver)
    hyper.add_argument("--neumann_steps", type=_positive_int, default=d.neumann_steps)
    hyper.add_argument("--neumann_alpha", type=_positive_float, default=d.neumann_alpha)
    hyper.add_argument("--cg_maxiter", type=_positive_int, default=d.cg_maxiter)
    hyper.add_argument("--cg_tol", type=float, default=d.cg_tol)
    hyper.add_argument("--hvp_batch", type=_positive_int, default=d.hvp_batch,
                       help="source examples in the Hessian-vector products")
    run = p.add_argument_group("execution")
    run.add_argument("--batched", action="store_true",
                     help="run the per-domain inner loops together with torch.func.vmap")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--seed", type=_nonnegative_int, default=d.seed)
    return p


def _family(args: argparse.Namespace, init: Optional[LossSpec]) -> Tuple[str, Optional[int]]:
    """(family, order) from --family/--order, checked against the --init loss."""
    if args.family is None:
        if args.order is not None:
            raise ValueError(f"--order {args.order} needs --family taylor")
        return (init.family, init.order) if init is not None else ("taylor", 4)
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


def _load_data(args: argparse.Namespace) -> DomainData:
    if args.dataset == "synthetic":
        return synthetic_domains(per_domain=args.per_domain_cap or 500, seed=args.data_seed)
    from ..meta.domainbed_data import load_domainbed_domains
    return load_domainbed_domains(args.dataset, args.data_dir, args.domainbed_root,
                                  args.per_domain_cap, args.data_seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 done, 1 non-finite stop, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        init = None if args.init is None else resolve_loss(args.init)
        family, order = _family(args, init)
        config = MetaConfig(
            family=family, order=order, outer_steps=args.outer_steps, inner_steps=args.inner_steps,
            inner_lr=args.inner_lr, batch_size=args.batch_size, hidden=args.hidden,
            solver=args.solver, neumann_steps=args.neumann_steps, neumann_alpha=args.neumann_alpha,
            cg_maxiter=args.cg_maxiter, cg_tol=args.cg_tol, hvp_batch=args.hvp_batch,
            outer_batch=args.outer_batch, eval_size=args.eval_size, aggregate=args.aggregate,
            outer_optimizer=args.outer_optimizer, outer_lr=args.outer_lr, batched=args.batched,
            seed=args.seed)
        device = _device(args.device)
    except (ValueError, LossFileError) as e:
        parser.error(str(e))
    try:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        data = _load_data(args)
        trainer = run_meta_training(data, config, args.output_dir, init=init, resume=args.resume,
                                    overwrite=args.overwrite, device=device,
                                    progress=not args.no_progress)
    except (RunDirError, DomainBedNotFound, FileNotFoundError, ValueError) as e:
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
