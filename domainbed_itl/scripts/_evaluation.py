"""What the commands that evaluate losses under the meta protocol share (evaluate_loss meta,
grid_search): their flags, the Protocol they make, and the evaluation of labelled losses in a run
folder. See docs/loss_search.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..analysis.evaluation_report import CONVERGENCE_METRICS, META_METRICS, Metric
from ..bridge.loss_evaluation import loss_definition, loss_function
from ..files.job_progress import duration_text
from ..files.runfolder import RunFolder
from ..losses.checks import check_minimisable
from ..meta.data import DomainData
from ..meta.evaluate import Protocol, evaluate_in_folder, evaluate_losses
from ._cli import (INNER_TRAINING, Distinct, add_flags, add_label_noise_flag, nonnegative_int,
                   positive_int, setting_flags)

Loss = Tuple[Callable[..., torch.Tensor] | torch.nn.Module, Any]
TIMED_STEPS = (2, 22)  # inner steps of the two timed trainings (their difference prices a step)
TIES = ("the paired differences of some comparisons are (nearly) the same on every seed, e.g. a "
        "loss that trains exactly as the reference does: their t-test has no spread to work "
        "with, so its p-value there means nothing (scipy warned of a precision loss); read the "
        "wins and the mean difference instead")


class DefaultsHelp(argparse.HelpFormatter):
    """--help that ends each flag's help with its default, unless the help already names it or
    there is none (a required flag, a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or action.required
                or default in (None, False, argparse.SUPPRESS)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})".strip().replace("%", "%%")


@contextlib.contextmanager
def said_once(note: str = TIES) -> Iterator[None]:
    """Keep scipy's RuntimeWarnings (precision loss on tied pairs) off the screen, and say once
    in words what they mean (`note`) on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    if any(issubclass(w.category, RuntimeWarning) for w in caught):
        print(f"note: {note}.", file=sys.stderr)


def name_reports(paths: Sequence[Path | str]) -> None:
    """The closing line: where the command wrote its reports."""
    print(f"\nwrote {', '.join(str(p) for p in paths)}")


def add_meta_protocol_flags(parser: argparse.ArgumentParser) -> None:
    """--seeds, --inner_steps, the inner-training flags, --eval_size, --per_domain_cap,
    --data_seed, --label_noise and --device."""
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", action=Distinct,
                        default=[0, 1, 2, 3, 4],
                        help="the seeds every loss is trained on (initial weights, minibatches)")
    parser.add_argument("--inner_steps", type=positive_int, nargs="+", action=Distinct, default=[1000],
                        help="report after each of these numbers of inner steps")
    add_flags(parser, "inner training (default: meta_train's)", INNER_TRAINING)
    parser.add_argument("--eval_size", default=Protocol().eval_size,
                        **setting_flags(Protocol, only=("eval_size",))["eval_size"])
    parser.add_argument("--per_domain_cap", type=positive_int, default=None,
                        help="use at most this many examples of each domain (default: all)")
    parser.add_argument("--data_seed", type=nonnegative_int, default=0,
                        help="seed of the data's construction and of the cap's choice")
    add_label_noise_flag(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def meta_protocol(args: argparse.Namespace) -> Protocol:
    """The Protocol of the flags of `add_meta_protocol_flags`."""
    return Protocol(tuple(args.inner_steps), eval_size=args.eval_size, **{
        k: getattr(args, k) for k in INNER_TRAINING if getattr(args, k) is not None})


def meta_settings(args: argparse.Namespace, protocol: Protocol) -> Dict[str, Any]:
    """The settings a report states: protocol, dataset, seeds, data sampling, inner training."""
    return {"protocol": "meta", "dataset": args.dataset, "seeds": args.seeds,
            "per_domain_cap": args.per_domain_cap, "data_seed": args.data_seed,
            **({"label_noise": args.label_noise} if args.label_noise else {}),
            **protocol.to_dict()}


def meta_metrics(protocol: Protocol) -> List[Metric]:
    """The report's metrics: held-out and source accuracy, held-out CE, the gap, and with a
    stopping rule the inner steps used and the stationarity reached."""
    return META_METRICS + (CONVERGENCE_METRICS if protocol.inner_stop_ratio is not None else [])


def meta_losses(losses: Mapping[str, str], device: torch.device,
                num_classes: Optional[int] = None) -> Dict[str, Loss]:
    """{label: (the loss on `device`, its definition)} of labelled --losses values; with
    `num_classes` (that of the data loaded, whatever the data set), each is first checked to be
    finite and minimisable for that many classes (domainbed_itl.losses.checks)."""
    built = {label: loss_function(loss) for label, loss in losses.items()}
    if num_classes is not None:
        for label, loss in built.items():
            check_minimisable(loss, num_classes, f"--losses {label}={losses[label]}")
    return {label: (_on(loss, device), loss_definition(losses[label]))
            for label, loss in built.items()}


def _on(loss: Callable[..., torch.Tensor] | torch.nn.Module, device: torch.device):
    return loss.to(device) if isinstance(loss, torch.nn.Module) else loss


def evaluate_meta(folder: RunFolder, data: DomainData, losses: Mapping[str, Loss],
                  args: argparse.Namespace, protocol: Protocol, device: torch.device,
                  command: str) -> List[Dict[str, Any]]:
    """Every loss on every seed of `args`, kept unit by unit in `folder`, after an estimate of the
    time it takes (unless --no_progress); the records."""
    if not args.no_progress:
        kept = folder.checkpoint["units"] if folder.checkpoint else []
        done = {(u["unit"], u["loss"]) for u in kept}
        left = [(seed, name) for seed in args.seeds for name in losses if (seed, name) not in done]
        if left:
            print(describe_meta_estimate(time_unit(data, losses[left[0][1]][0], left[0][1],
                                                   protocol, device), protocol, len(left)),
                  flush=True)
    return evaluate_in_folder(folder, data, losses, args.seeds, protocol, device,
                              provenance={"command": command}, progress=not args.no_progress)


@dataclasses.dataclass(frozen=True)
class UnitTiming:
    """Seconds measured here for a unit of the meta protocol: a fixed part (drawing, building and
    evaluating the networks) and one inner step; which loss was timed."""

    loss: str
    fixed_s: float
    step_s: float


def time_unit(data: DomainData, loss: Callable[..., torch.Tensor] | torch.nn.Module, name: str,
              protocol: Protocol, device: torch.device) -> UnitTiming:
    """Time two trainings of one unit of loss `name` (seed 0) of TIMED_STEPS inner steps, after an
    untimed one (warm-up), each the faster of two (other work on the machine slows some); their
    difference prices a step, the rest is the unit's fixed part."""
    seconds = []
    for steps, repeats in ((TIMED_STEPS[0], 1), (TIMED_STEPS[0], 2), (TIMED_STEPS[1], 2)):
        short = Protocol(**{**protocol.to_dict(), "inner_steps": (steps,), "inner_stop_ratio": None})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            evaluate_losses(data, {name: loss}, [0], short, device)
            times.append(time.perf_counter() - start)
        seconds.append(min(times))
    step_s = max(seconds[2] - seconds[1], 0.0) / (TIMED_STEPS[1] - TIMED_STEPS[0])
    return UnitTiming(name, max(seconds[1] - TIMED_STEPS[0] * step_s, 0.0), step_s)


def describe_meta_estimate(timing: UnitTiming, protocol: Protocol, n_units: int) -> str:
    """What `n_units` units cost at `timing`: with one training read off at every length, the
    longest; else one training per length (a stopping rule may end them sooner)."""
    steps = (max(protocol.inner_steps) if protocol.inner.plain else sum(protocol.inner_steps))
    unit_s = timing.fixed_s + steps * timing.step_s
    bound = "" if protocol.inner_stop_ratio is None else "at most "
    return (f"estimate (timed here on loss {timing.loss}, seed 0, {TIMED_STEPS[1]} inner steps): "
            f"{1000 * timing.step_s:.1f} ms an inner step; a unit (a loss on a seed) of {steps} "
            f"steps takes {bound}about {duration_text(unit_s)}, the {n_units} unit"
            f"{'s' * (n_units != 1)} left {bound}about {duration_text(n_units * unit_s)}. Fewer "
            "--seeds, --losses or --inner_steps make it shorter.")

