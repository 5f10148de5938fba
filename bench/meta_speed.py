"""Meta-training speed: seconds per outer step, sequential vs batched, against the arithmetic floor.

    python bench/meta_speed.py --data_dir DATA --domainbed_root DOMAINBED   # the paper protocol
    python bench/meta_speed.py                                              # synthetic, same sizes

One run, on the same data and configuration (by default the paper protocol: RotatedMNIST's six
domains of ~1667 digits, MLP 784-256-10, 1000 inner SGD steps of batch 32, Neumann J = 15 on 256
examples):

1. counts the floating-point operations of one outer step (torch.utils.flop_counter), and
   measures this machine's matrix-multiply throughput on the step's own matrix shapes and on a
   large square product;
2. times `--steps` outer steps in each mode, sequential (one inner network after another) and
   batched (the n networks as one stack), alternating between the modes after one warm-up step
   each, and prints the median step time, its parts, and the step's FLOPs divided by the measured
   throughput: the time the arithmetic alone would take; and the inner steps each domain's
   network took (with a stopping rule, e.g. `--preset stationary`, the steps it needed to reach
   it; without one, the step count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from domainbed_itl.meta.data import DomainData, synthetic_domains
from domainbed_itl.meta.config import preset_config
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.trainer import MetaTrainer


def matmul_throughput(shapes, repeats: int = 50) -> float:
    """Median FLOP/s of torch.bmm over the given (batch, m, k, n) shapes, one after another."""
    operands = [(torch.randn(b, m, k), torch.randn(b, k, n)) for b, m, k, n in shapes]
    flops = sum(2 * b * m * k * n for b, m, k, n in shapes)
    for a, w in operands:
        torch.bmm(a, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for a, w in operands:
            torch.bmm(a, w)
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def step_flops(data: DomainData, config: MetaConfig, device: str) -> float:
    """FLOPs of one outer step, counted by torch's FlopCounterMode (matrix products dominate)."""
    trainer = MetaTrainer(data.domains, data.num_classes, config, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.outer_step()
    return float(counter.get_total_flops())


def measure(data: DomainData, base: MetaConfig, steps: int, device: str) -> Dict[str, Dict[str, float]]:
    """Median per-step seconds (total, inner training, hypergradient, diagnostics) of both modes,
    and under "inner_steps" the median over the measured steps of each domain's inner steps.

    The two modes alternate step by step, so a change in machine load hits both alike.
    """
    runs, used = {}, {"sequential": [], "batched": []}
    for mode in ("sequential", "batched"):
        config = MetaConfig(**{**base.to_dict(), "batched": mode == "batched"})
        trainer = MetaTrainer(data.domains, data.num_classes, config, device=device)
        trainer.outer_step()  # warm-up
        runs[mode] = (trainer, [])
    for _ in range(steps):
        for mode, (trainer, rows) in runs.items():
            record = trainer.outer_step()
            used[mode].append(record["per_domain"]["inner_steps_used"])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows.append({"step": record["time_step_s"], "inner": record["time_inner_s"],
                         "hypergradient": record["time_hypergradient_s"],
                         "diagnostics": record["time_diagnostics_s"]})
    return {mode: {**{k: statistics.median(r[k] for r in rows) for k in rows[0]},
                   "inner_steps": [statistics.median(d) for d in zip(*used[mode])]}
            for mode, (_, rows) in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="MNIST folder: RotatedMNIST through DomainBed")
    p.add_argument("--domainbed_root", default=None)
    p.add_argument("--per_domain", type=int, default=None, help="examples per domain (default all)")
    p.add_argument("--inner_steps", type=int, default=None, help="default: the preset's (1000)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--preset", default="paper")
    p.add_argument("--steps", type=int, default=3, help="measured outer steps per mode")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_dir:
        from domainbed_itl.bridge.domainbed_data import load_domainbed_domains
        data = load_domainbed_domains("RotatedMNIST", args.data_dir, args.domainbed_root,
                                      per_domain_cap=args.per_domain)
    else:
        data = synthetic_domains(6, args.per_domain or 1667, 784, 10, seed=0, noise=2.0)
    overrides = {"hidden": (args.hidden,)}
    if args.inner_steps:
        overrides["inner_steps"] = args.inner_steps
    base = preset_config(args.preset, overrides)
    n, features = len(data.domains), data.domains[0][0].shape[1]
    print(f"data: {data.name}, {n} domains x {[len(y) for _, y in data.domains]} examples, "
          f"{features} features; MLP {features}-{args.hidden}-{data.num_classes}; preset "
          f"{args.preset}: {base.inner_steps} inner {base.inner_optimizer} steps of batch "
          f"{base.batch_size}, {base.solver} J={base.neumann_steps} on {base.hvp_batch} examples; "
          f"device {args.device}, {torch.get_num_threads()} threads")

    flops = step_flops(data, base, args.device)
    own = matmul_throughput([(n, base.batch_size, features, args.hidden),
                             (n, args.hidden, base.batch_size, features)])
    square = matmul_throughput([(1, 2048, 2048, 2048)], repeats=5)
    print(f"one outer step: {flops / 1e9:.0f} GFLOP; matmul throughput {own / 1e9:.0f} GFLOP/s on "
          f"the inner loop's shapes, {square / 1e9:.0f} GFLOP/s on 2048^3")

    results = measure(data, base, args.steps, args.device)
    print(f"{'mode':<11} {'s/outer step':>12} {'inner train':>12} {'hypergrad':>10} "
          f"{'diagnostics':>12} {'floor (own shapes)':>19}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['step']:>12.3f} {r['inner']:>12.3f} {r['hypergradient']:>10.3f} "
              f"{r['diagnostics']:>12.3f} {flops / own:>19.3f}")
    for mode, r in results.items():
        print(f"{mode}: inner steps per domain (median over the measured steps; cap "
              f"{base.inner_steps}, stopping rule {base.inner_stop_ratio}): "
              f"{', '.join(f'{s:g}' for s in r['inner_steps'])}")
    seq, bat = results["sequential"], results["batched"]
    print(f"batched speed-up per outer step: {seq['step'] / bat['step']:.2f}x; batched step / "
          f"arithmetic floor: {bat['step'] / (flops / own):.2f}x (on 2048^3 throughput: "
          f"{bat['step'] / (flops / square):.2f}x)")


if __name__ == "__main__":
    main()
