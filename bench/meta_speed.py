"""Meta-training speed: seconds per outer step, sequential vs batched, against the arithmetic floor.

    python bench/meta_speed.py --data_dir DATA --domainbed_root DOMAINBED   # the paper protocol
    python bench/meta_speed.py                                              # synthetic, same sizes

One run, on the same data and configuration (by default the paper protocol: RotatedMNIST's six
domains of ~1667 digits, MLP 784-256-10, 1000 inner SGD steps of batch 32, Neumann J = 15 on 256
examples), on `--device`:

1. counts the floating-point operations of one outer step (torch.utils.flop_counter, with the
   in-place matrix products, e.g. the inner loop's fused SGD update, counted too);
2. times `--steps` outer steps in each mode, sequential (one inner network after another) and
   batched (the n networks as one stack), alternating between the modes after one warm-up step
   each; before each pair of steps it measures the device's matrix-multiply throughput on the
   inner loop's own matrix shapes, so that a change in machine load hits the floor and the steps
   alike;
3. prints the median step time, its parts, and the floor: the step's FLOPs divided by the median
   throughput, the time the arithmetic alone would take; and the inner steps each domain's
   network took (with a stopping rule, e.g. `--preset stationary`, the steps it needed to reach
   it; without one, the step count).

On CUDA every time is read after torch.cuda.synchronize(), so that it includes the queued work.
On a CPU shared with other jobs, `--clock cpu --threads 1` times the steps and the floor in this
process's CPU seconds, which the other jobs' share of the cores does not inflate.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from domainbed_itl.meta.config import MetaConfig, preset_config
from domainbed_itl.meta.data import DomainData, synthetic_domains
from domainbed_itl.meta.trainer import MetaTrainer, clock


def _product_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """2·(batch)·m·k·n for self + a @ b with a (..., m, k) and b (..., k, n)."""
    batch = a_shape[0] if len(a_shape) == 3 else 1
    return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


# FlopCounterMode counts torch.baddbmm and addmm but not their in-place forms, which the inner
# loop's fused SGD update is (one weight-gradient product per layer and step).
IN_PLACE_FLOPS = {torch.ops.aten.baddbmm_: _product_flops, torch.ops.aten.addmm_: _product_flops}


Clock = Callable[[], float]


def wall_clock(device: torch.device) -> Clock:
    """The wall clock, read only once `device` has finished its queued work."""
    return functools.partial(clock, device)


def timed(fn: Callable[[], object], now: Clock) -> Tuple[float, object]:
    """(seconds, result) of fn(), timed by the clock `now`."""
    start = now()
    result = fn()
    return now() - start, result


def matmul_throughput(shapes: Sequence[Tuple[int, int, int, int]], device: torch.device,
                      now: Clock, repeats: int = 20) -> float:
    """Median FLOP/s of torch.bmm on `device` over the given (batch, m, k, n) shapes, one after
    another."""
    operands = [(torch.randn(b, m, k, device=device), torch.randn(b, k, n, device=device))
                for b, m, k, n in shapes]
    flops = sum(2 * b * m * k * n for b, m, k, n in shapes)

    def products() -> None:
        for a, w in operands:
            torch.bmm(a, w)

    products()
    return flops / statistics.median(timed(products, now)[0] for _ in range(repeats))


def step_flops(data: DomainData, config: MetaConfig, device: torch.device) -> float:
    """FLOPs of one outer step, counted by torch's FlopCounterMode (matrix products dominate)."""
    trainer = MetaTrainer(data.domains, data.num_classes, config, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=IN_PLACE_FLOPS)
    with counter:
        trainer.outer_step()
    return float(counter.get_total_flops())


def measure(data: DomainData, base: MetaConfig, steps: int, device: torch.device,
            shapes: Sequence[Tuple[int, int, int, int]],
            now: Clock) -> Tuple[Dict[str, Dict[str, Any]], float]:
    """(median per-step seconds (step, inner training, hypergradient, diagnostics) of both modes,
    with under "inner_steps" the median over the measured steps of each domain's inner steps;
    median matmul throughput in FLOP/s measured between the steps).

    The two modes alternate step by step, and the throughput is measured before each pair, so a
    change in machine load hits all three alike. The step is timed here by `now`; its parts are
    the trainer's own record (wall clock).
    """
    runs, used = {}, {"sequential": [], "batched": []}
    for mode in ("sequential", "batched"):
        config = MetaConfig(**{**base.to_dict(), "batched": mode == "batched"})
        trainer = MetaTrainer(data.domains, data.num_classes, config, device=device)
        trainer.outer_step()  # warm-up
        runs[mode] = (trainer, [])
    throughputs: List[float] = []
    for _ in range(steps):
        throughputs.append(matmul_throughput(shapes, device, now))
        for mode, (trainer, rows) in runs.items():
            seconds, record = timed(trainer.outer_step, now)
            used[mode].append(record["per_domain"]["inner_steps_used"])
            rows.append({"step": seconds, "inner": record["time_inner_s"],
                         "hypergradient": record["time_hypergradient_s"],
                         "diagnostics": record["time_diagnostics_s"]})
    return ({mode: {**{k: statistics.median(r[k] for r in rows) for k in rows[0]},
                    "inner_steps": [statistics.median(d) for d in zip(*used[mode])]}
             for mode, (_, rows) in runs.items()}, statistics.median(throughputs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="MNIST folder: RotatedMNIST through DomainBed "
                   "(default: synthetic Gaussian domains of the same sizes)")
    p.add_argument("--domainbed_root", default=None)
    p.add_argument("--per_domain", type=int, default=None, help="examples per domain (default all)")
    p.add_argument("--inner_steps", type=int, default=None, help="default: the preset's (1000)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--preset", default="paper")
    p.add_argument("--steps", type=int, default=3, help="measured outer steps per mode")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--square", type=int, default=2048, help="size of the square product whose "
                   "throughput is printed beside the inner loop's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time instead of the wall clock, for a CPU shared "
                        "with other jobs (use with --threads 1: it adds up every thread's time)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error(f"--clock cpu times CPU work; --device {args.device} needs --clock wall")
    now = time.process_time if args.clock == "cpu" else wall_clock(device)
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
          f"device {device}, {torch.get_num_threads()} threads, {args.clock} clock")

    flops = step_flops(data, base, device)
    # The inner loop's big products: the first layer's forward and its weight gradient.
    shapes = [(n, base.batch_size, features, args.hidden), (n, args.hidden, base.batch_size, features)]
    square = matmul_throughput([(1, args.square, args.square, args.square)], device, now, repeats=5)
    results, own = measure(data, base, args.steps, device, shapes, now)
    floor = flops / own
    print(f"one outer step: {flops / 1e9:.0f} GFLOP; matmul throughput {own / 1e9:.0f} GFLOP/s on "
          f"the inner loop's shapes (median over the steps), {square / 1e9:.0f} GFLOP/s on "
          f"{args.square}^3")
    print(f"{'mode':<11} {'s/outer step':>12} {'inner train':>12} {'hypergrad':>10} "
          f"{'diagnostics':>12} {'floor (own shapes)':>19}   (the parts: wall clock)")
    for mode, r in results.items():
        print(f"{mode:<11} {r['step']:>12.3f} {r['inner']:>12.3f} {r['hypergradient']:>10.3f} "
              f"{r['diagnostics']:>12.3f} {floor:>19.3f}")
    for mode, r in results.items():
        print(f"{mode}: inner steps per domain (median over the measured steps; cap "
              f"{base.inner_steps}, stopping rule {base.inner_stop_ratio}): "
              f"{', '.join(f'{s:g}' for s in r['inner_steps'])}")
    seq, bat = results["sequential"], results["batched"]
    print(f"batched speed-up per outer step: {seq['step'] / bat['step']:.2f}x; batched step / "
          f"arithmetic floor: {bat['step'] / floor:.2f}x (on {args.square}^3 throughput: "
          f"{bat['step'] / (flops / square):.2f}x)")


if __name__ == "__main__":
    main()
