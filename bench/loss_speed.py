"""Time of a full training step with ITL divided by the same step with cross-entropy.

    python bench/loss_speed.py [--domainbed_root PATH] [--repeats 30] [--threads N]

A step is forward, loss, backward and Adam. Both losses train the same model on the same batch,
in interleaved blocks within one run; the ratio is of the median block times. Models: DomainBed's
MNIST_CNN (RotatedMNIST's network; needs a DomainBed checkout) and a small MLP of DomainBed's
MLP shape (784-256-256-10), at DomainBed's batch for RotatedMNIST (64 images x 5 training
domains = 320) and at 64; then the loss alone (forward and backward) on fixed logits. ITL is
timed with its pure-torch fused ops (TaylorLoss's default, and its path on GPUs) and with its
compiled C++ kernel (opt-in on CPUs: DOMAINBED_ITL_CPU_KERNEL=1 or backend="cpp"; this script
builds it, once, into torch's extension cache); 'horner' and 'term-by-term' time the
differentiable form used by the meta-learner and the naive Eq. 10 oracle.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from domainbed_itl.bridge.domainbed_env import DomainBedNotFound, import_domainbed
from domainbed_itl.losses import (ITL_PARAMETERS, TaylorLoss, taylor_loss,
                                  taylor_loss_reference)


def _losses():
    omega = torch.tensor(ITL_PARAMETERS)
    return {
        "cross-entropy": F.cross_entropy,
        "ITL (C++ kernel)": TaylorLoss(backend="cpp"),
        "ITL (torch ops)": TaylorLoss(backend="torch"),
        "horner": lambda z, y: taylor_loss(z, y, omega, 4),
        "term-by-term": lambda z, y: taylor_loss_reference(z, y, omega, 4),
    }


def time_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int,
               block: int) -> dict:
    """Median seconds per step for each loss, measured in interleaved blocks."""
    losses = _losses()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(loss_fn):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for loss_fn in losses.values():
        for _ in range(3):
            step(loss_fn)
    times = {name: [] for name in losses}
    for _ in range(repeats):
        for name, loss_fn in losses.items():
            start = time.perf_counter()
            for _ in range(block):
                step(loss_fn)
            times[name].append((time.perf_counter() - start) / block)
    return {name: statistics.median(values) for name, values in times.items()}


def time_loss_alone(batch: int, classes: int, repeats: int, block: int = 50) -> dict:
    """Median microseconds of one loss forward and backward on fixed logits, for each loss."""
    logits = torch.randn(batch, classes)
    target = torch.randint(0, classes, (batch,))
    times = {name: [] for name in _losses()}
    for _ in range(repeats):
        for name, loss_fn in _losses().items():
            start = time.perf_counter()
            for _ in range(block):
                loss_fn(logits.clone().requires_grad_(), target).backward()
            times[name].append((time.perf_counter() - start) / block * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domainbed_root", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setups = []
    try:
        networks = import_domainbed(args.domainbed_root, "domainbed.networks")
        cnn = torch.nn.Sequential(networks.MNIST_CNN((1, 28, 28)), torch.nn.Linear(128, 10))
        setups.append(("DomainBed MNIST_CNN", cnn, (1, 28, 28), 320, 2))
    except DomainBedNotFound as error:
        print(f"skipping DomainBed's MNIST_CNN: {error}\n")
    for batch in (320, 64):
        mlp = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                  torch.nn.ReLU(), torch.nn.Linear(256, 10))
        setups.append(("MLP 784-256-256-10", mlp, (784,), batch, 20))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"median of {args.repeats} interleaved blocks\n")
    print(f"{'model':<22}{'batch':>6}{'CE ms/step':>12}   ratio to CE: "
          + "  ".join(f"{n}" for n in list(_losses())[1:]))
    for name, model, shape, batch, block in setups:
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        medians = time_steps(model, x, y, args.repeats, block)
        ce = medians["cross-entropy"]
        ratios = "  ".join(f"{medians[n] / ce:>{len(n)}.3f}" for n in list(medians)[1:])
        print(f"{name:<22}{batch:>6}{ce * 1e3:>12.2f}   {'':>12}{ratios}")

    print("\nThe loss alone, forward and backward on fixed (batch, 10) logits, microseconds:")
    print(f"{'batch':>6}  " + "  ".join(f"{n:>14}" for n in _losses()))
    for batch in (64, 320):
        alone = time_loss_alone(batch, 10, args.repeats)
        print(f"{batch:>6}  " + "  ".join(f"{alone[n]:>14.1f}" for n in alone))


if __name__ == "__main__":
    main()
