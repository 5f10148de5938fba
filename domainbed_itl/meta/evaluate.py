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

import torch
import torch.nn.functional as F

from . import inner
from .config import InnerSettings, check_bool, check_positive_int
from .data import DomainData
from .draws import StepDraws, domain_indices, draw_step, evaluation_generator

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Protocol:
    """The inner training every loss gets: base network, optimiser, batch, and the step counts
    after which the networks are evaluated (MetaConfig's inner settings, with several lengths)."""

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
        _ = self.inner  # validates the inner-training settings
        if self.eval_size is not None:
            check_positive_int("eval_size", self.eval_size)
        check_bool("batched", self.batched)

    @property
    def inner(self) -> InnerSettings:
        """The inner-training settings, trained to the longest of `inner_steps`."""
        return InnerSettings(max(self.inner_steps), self.inner_lr, self.inner_optimizer,
                             self.inner_momentum, self.batch_size, self.hidden)

    def to_dict(self) -> Dict[str, Any]:
        """The protocol as a plain dict (for the report)."""
        return asdict(self)


def _draws(data: DomainData, seed: int, protocol: Protocol) -> StepDraws:
    """Initial-weight seeds, minibatches and source evaluation subsets of one seed (CPU)."""
    domains, sources = domain_indices([len(y) for _, y in data.domains])
    return draw_step(evaluation_generator(seed), domains, sources, max(protocol.inner_steps),
                     protocol.batch_size, eval_size=protocol.eval_size)


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
    optimizer = protocol.inner.optimizer()
    records = []
    for seed in seeds:
        draws = _draws(data, seed, protocol)
        batches = draws.batches.to(device)
        for name, loss in losses.items():
            params = inner.init_params(model, draws.init_seeds, device)
            state = optimizer.init_state(params)
            done, history = 0, []
            for steps in protocol.inner_steps:
                history.append(inner.train(params, loss, optimizer, state, x, y,
                                           batches[:, done:steps], batched=protocol.batched))
                done = steps
                train_losses = torch.cat(history, dim=1)
                for i, env in enumerate(data.environments):
                    idx, src = draws.heldout[i].to(device), draws.source_eval[i].to(device)
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
