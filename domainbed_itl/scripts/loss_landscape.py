"""Fig. 8: the 1-D landscape of the training loss along the top Hessian eigenvector.

    python -m domainbed_itl.scripts.loss_landscape runs/ERM_env0 runs/ITL_env0 --data_dir ./data \
        --domainbed_root ../DomainBed --output_dir analyses [--loss ce|own] [--radius 1]

See docs/analyses.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402

from ..analysis.hessian import (FlatParameters, hessian_vector_product, landscape_1d, lanczos,  # noqa: E402
                                mean_loss, residual)
from ..analysis.output import plan_analysis, write_outputs  # noqa: E402
from ..bridge.trained_models import batches, describe_run, Predictor, RunError, subsample  # noqa: E402
from ._cli import CommandParser, add_trained_run_flags, command_main, integer, trained_models  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("loss_landscape", description=__doc__.split("\n\n")[0])
    add_trained_run_flags(parser)
    parser.add_argument("--loss", choices=("ce", "own"), default="ce",
                        help="cross-entropy for every model, or each model's own training loss")
    parser.add_argument("--examples", type=integer, default=1024,
                        help="samples of the source (and of the target) environments used")
    parser.add_argument("--lanczos_steps", type=integer, default=20)
    parser.add_argument("--radius", type=float, default=1.0, help="t runs over [-radius, radius]")
    parser.add_argument("--points", type=integer, default=41, help="values of t")
    parser.add_argument("--seed", type=integer, default=0, help="sample choice and Lanczos start vector")
    return parser


def _check(args: argparse.Namespace) -> None:
    for name, minimum in (("examples", 1), ("lanczos_steps", 1), ("points", 2), ("batch_size", 1)):
        if getattr(args, name) < minimum:
            raise RunError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")
    if not args.radius > 0:
        raise RunError(f"--radius must be positive, got {args.radius}")


def _figure(results: List[Dict]):
    fig, axes = plt.subplots(2, 1, figsize=(6, 7), sharex=True)
    for colour, r in enumerate(results):
        name = f"{r['label']} (test {','.join(map(str, r['test_envs']))}), λ={r['top_eigenvalue']:.3g}"
        axes[0].plot(r["t"], r["source_loss"], color=f"C{colour}", label=name)
        axes[1].plot(r["t"], r["target_loss"], color=f"C{colour}", label=name)
    ylabel = "cross-entropy" if results[0]["loss"] == "cross-entropy" else "training loss"
    axes[0].set(title="source domains (training data)", ylabel=ylabel)
    axes[1].set(title="target domains", ylabel=ylabel, xlabel="t (θ + t·v, v: top Hessian eigenvector)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    _check(args)
    plan = plan_analysis(args.output_dir, "loss_landscape", args.overwrite)
    results = []
    for run, model, splits in trained_models(args):
        loss = model.training_loss() if args.loss == "own" else F.cross_entropy
        source = subsample(ConcatDataset([splits.in_splits[i] for i in splits.sources]), args.examples,
                           args.seed)
        target = subsample(ConcatDataset([splits.in_splits[i] for i in splits.test_envs]), args.examples,
                           args.seed)
        source_batches = batches(source, args.batch_size, args.device)
        target_batches = batches(target, args.batch_size, args.device)
        flat = FlatParameters(Predictor(model.algorithm))
        theta = flat.theta
        matvec = hessian_vector_product(flat, loss, source_batches, theta)
        start = torch.randn(len(theta), generator=torch.Generator().manual_seed(args.seed)).to(theta)
        pairs = lanczos(matvec, start, args.lanczos_steps)
        value, vector = pairs.top()
        ts = [args.radius * (2 * i / (args.points - 1) - 1) for i in range(args.points)]
        loss_name = "cross-entropy" if args.loss == "ce" else f"training loss of {model.label}"
        result = {**describe_run(run, model), "loss": loss_name,
                  "parameters": len(theta), "source_examples": len(source),
                  "target_examples": len(target),
                  "top_eigenvalue": value, "residual": residual(matvec, value, vector),
                  "ritz_values": pairs.values.tolist(), "lanczos_steps": pairs.steps, "t": ts,
                  "source_loss": landscape_1d(functools.partial(mean_loss, flat, loss, source_batches),
                                              theta, vector, ts),
                  "target_loss": landscape_1d(functools.partial(mean_loss, flat, loss, target_batches),
                                              theta, vector, ts)}
        results.append(result)
        mid, end = len(ts) // 2, len(ts) - 1
        print(f"{model.label} test_envs {model.test_envs} ({run.folder}): {len(theta)} parameters, "
              f"λ_max {value:.5g} (residual {result['residual']:.2g}, {pairs.steps} Lanczos steps); "
              f"source loss {result['source_loss'][0]:.4g} / {result['source_loss'][mid]:.4g} / "
              f"{result['source_loss'][end]:.4g}, target loss {result['target_loss'][0]:.4g} / "
              f"{result['target_loss'][mid]:.4g} / {result['target_loss'][end]:.4g} "
              f"at t = {ts[0]:g} / {ts[mid]:g} / {ts[end]:g}", flush=True)
    if not results:
        raise RunError(f"no run of the algorithms {args.algorithms} under {', '.join(args.inputs)}")
    fig = _figure(results)
    paths = write_outputs(plan, fig, {"models": results})
    plt.close(fig)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
