"""Meta-training speed: seconds per outer step, sequential vs batched, and where the time goes.

    python bench/meta_speed.py                       # synthetic RotatedMNIST-sized domains
    python bench/meta_speed.py --data_dir ../shared/data/mnist10k --domainbed_root ../DomainBed

One run measures both modes on the same data and configuration (a reduced protocol: few inner
steps and examples, the paper's base network by default): after one warm-up outer step each,
`--steps` outer steps per mode, alternating between the modes, reporting the median step time,
the inner-training time, the hypergradient time and, inside it, the time spent in the linear
solver (Neumann series).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch

from domainbed_itl.meta.data import DomainData, synthetic_domains
from domainbed_itl.meta.trainer import MetaConfig, MetaTrainer


class TimedSolve:
    """A solver wrapper that accumulates the wall time spent inside the solver."""

    def __init__(self, solve):
        self.solve, self.seconds = solve, 0.0

    def __call__(self, matvec, b):
        start = time.perf_counter()
        x = self.solve(matvec, b)
        self.seconds += time.perf_counter() - start
        return x


def measure(data: DomainData, base: MetaConfig, steps: int,
            device: str) -> Dict[str, Dict[str, float]]:
    """Median per-step seconds (total, inner training, hypergradient, solver) of both modes.

    The two modes alternate step by step, so a change in machine load hits both alike.
    """
    runs = {}
    for mode in ("sequential", "batched"):
        timed = TimedSolve(base.solve())
        config = MetaConfig(**{**base.to_dict(), "batched": mode == "batched"})
        trainer = MetaTrainer(data.domains, data.num_classes, config, device=device, solve=timed)
        trainer.outer_step()  # warm-up
        runs[mode] = (trainer, timed, [])
    for _ in range(steps):
        for trainer, timed, rows in runs.values():
            timed.seconds = 0.0
            record = trainer.outer_step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows.append({"step": record["time_step_s"], "inner": record["time_inner_s"],
                         "hypergradient": record["time_hypergradient_s"],
                         "solver": timed.seconds})
    return {mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            for mode, (_, _, rows) in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="mnist10k folder (RotatedMNIST via DomainBed)")
    p.add_argument("--domainbed_root", default=None)
    p.add_argument("--per_domain", type=int, default=256)
    p.add_argument("--inner_steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--hvp_batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="measured outer steps per mode")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_dir:
        from domainbed_itl.meta.domainbed_data import load_domainbed_domains
        data = load_domainbed_domains("RotatedMNIST", args.data_dir, args.domainbed_root,
                                      per_domain_cap=args.per_domain)
    else:
        data = synthetic_domains(6, args.per_domain, 784, 10, seed=0, noise=2.0)
    base = MetaConfig(inner_steps=args.inner_steps, hidden=(args.hidden,), hvp_batch=args.hvp_batch,
                      eval_size=None)
    print(f"data: {data.name}, {len(data.domains)} domains x {args.per_domain} examples, "
          f"{data.domains[0][0].shape[1]} features; MLP {data.domains[0][0].shape[1]}-{args.hidden}-"
          f"{data.num_classes}; inner {args.inner_steps} SGD steps of batch {base.batch_size}; "
          f"Neumann J={base.neumann_steps} on {args.hvp_batch} source examples; device "
          f"{args.device}, {torch.get_num_threads()} threads")
    results = measure(data, base, args.steps, args.device)
    print(f"{'mode':<11} {'s/outer step':>12} {'inner train':>12} {'hypergrad':>10} {'solver':>8}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['step']:>12.3f} {r['inner']:>12.3f} {r['hypergradient']:>10.3f} "
              f"{r['solver']:>8.3f}")
    seq, bat = results["sequential"], results["batched"]
    print(f"batched speed-up per outer step: {seq['step'] / bat['step']:.2f}x "
          f"(inner training {seq['inner'] / bat['inner']:.2f}x, hypergradient "
          f"{seq['hypergradient'] / bat['hypergradient']:.2f}x)")
    for mode, r in results.items():
        print(f"{mode}: solver {r['solver']:.3f} s vs inner training {r['inner']:.3f} s per outer step "
              f"(solver = {100 * r['solver'] / r['step']:.0f}% of the step)")


if __name__ == "__main__":
    main()
