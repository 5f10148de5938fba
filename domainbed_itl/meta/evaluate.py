"""The meta protocol of `scripts/evaluate_loss`: losses compared through the inner loop.

For every seed, one fresh base MLP per held-out domain is trained on the other domains with
each loss, from the same initial weights and on the same minibatches (the seed draws both, the
loss does not), then evaluated on its held-out domain (accuracy, cross-entropy) and on its
source domains (accuracy). So every loss meets exactly the same networks and data, and the
seeds pair the losses. Training can be read off at several lengths (`inner_steps`), which shows
whether a loss only trains faster or also generalises better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import inner
from .data import DomainData

LossFn = Callable[..., torch.Tensor]
_EVAL_STREAM = 0x45564C  # keeps evaluation draws apart from meta-training's (seed, step) draws


@dataclass(frozen=True)
class Protocol:
    """The inner training every loss gets: base network, optimiser, steps, batch."""

    inner_steps: Tuple[int, ...] = (1000,)
    inner_lr: float = 0.01
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    batch_size: int = 32
    hidden: Tuple[int, ...] = (256,)
    eval_size: Optional[int] = 2048
    batched: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inner_steps", tuple(sorted(set(self.inner_steps))))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if not self.inner_steps or min(self.inner_steps) < 1:
            raise ValueError(f"inner_steps must be positive step counts, got {self.inner_steps!r}")
        if self.batch_size < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"batch_size and hidden widths must be positive, got {self.batch_size!r} "
                             f"and {self.hidden!r}")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr!r}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"eval_size must be positive or None, got {self.eval_size!r}")
        inner.InnerOptimizer(self.inner_optimizer, self.inner_lr, self.inner_momentum)

    def to_dict(self) -> Dict[str, Any]:
        """The protocol as a plain dict (for the report)."""
        return asdict(self)


def _generator(seed: int) -> torch.Generator:
    state = np.random.SeedSequence([_EVAL_STREAM, seed]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _draws(data: DomainData, seed: int, protocol: Protocol) -> Dict[str, Any]:
    """Initial-weight seeds, minibatches and source evaluation subsets of one seed (CPU)."""
    sizes = [len(y) for _, y in data.domains]
    bounds = np.cumsum([0, *sizes]).tolist()
    domain_index = [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    source_index = [torch.cat(domain_index[:i] + domain_index[i + 1:]) for i in range(len(sizes))]
    g = _generator(seed)
    steps = max(protocol.inner_steps)
    batches = torch.stack([s[torch.randint(len(s), (steps, protocol.batch_size), generator=g)]
                           for s in source_index])
    evals = [s if protocol.eval_size is None or protocol.eval_size >= len(s)
             else s[torch.randperm(len(s), generator=g)[:protocol.eval_size]] for s in source_index]
    return {"init_seeds": torch.randint(2 ** 62, (len(sizes),), generator=g).tolist(),
            "batches": batches, "heldout": domain_index, "source_eval": evals}


def _accuracy_and_ce(params: inner.Params, i: int, x: torch.Tensor,
                     y: torch.Tensor) -> Tuple[float, float]:
    logits = inner.predict({k: p[i:i + 1] for k, p in params.items()}, x)[0]
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def evaluate_losses(data: DomainData, losses: Mapping[str, LossFn], seeds: Sequence[int],
                    protocol: Protocol, device: str | torch.device = "cpu",
                    progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Train and evaluate every loss on every seed; one record per (loss, seed, domain, steps).

    losses: name -> loss(logits, target, reduction=...) called like F.cross_entropy. Records
    hold loss, unit (the seed), domain (its environment name), domain_index, inner_steps,
    heldout_acc, heldout_ce, source_acc, gap (source_acc − heldout_acc) and final_train_loss.
    """
    if not losses or not seeds:
        raise ValueError("evaluate_losses needs at least one loss and one seed")
    device = torch.device(device)
    x = torch.cat([d[0] for d in data.domains]).to(device, torch.float32)
    y = torch.cat([d[1] for d in data.domains]).to(device)
    model = inner.mlp(x.shape[1], protocol.hidden, data.num_classes)
    optimizer = inner.InnerOptimizer(protocol.inner_optimizer, protocol.inner_lr,
                                     protocol.inner_momentum)
    records = []
    for seed in seeds:
        draws = _draws(data, seed, protocol)
        batches = draws["batches"].to(device)
        for name, loss in losses.items():
            params = inner.init_params(model, draws["init_seeds"], device)
            state = optimizer.init_state(params)
            done, history = 0, []
            for steps in protocol.inner_steps:
                history.append(inner.train(params, loss, optimizer, state, x, y,
                                           batches[:, done:steps], batched=protocol.batched))
                done = steps
                train_losses = torch.cat(history, dim=1)
                for i, env in enumerate(data.environments):
                    idx, src = draws["heldout"][i].to(device), draws["source_eval"][i].to(device)
                    acc, ce = _accuracy_and_ce(params, i, x[idx], y[idx])
                    source_acc, _ = _accuracy_and_ce(params, i, x[src], y[src])
                    records.append({
                        "loss": name, "unit": seed, "domain": env, "domain_index": i,
                        "inner_steps": steps, "heldout_acc": acc, "heldout_ce": ce,
                        "source_acc": source_acc, "gap": source_acc - acc,
                        "final_train_loss": float(train_losses[i, -max(1, steps // 10):].mean())})
            if progress is not None:
                progress(f"seed {seed}, loss {name}: done")
    return records
