"""The inner loop (Algorithm 1, lines 9-11): n base networks trained at once on a fixed loss.

Their parameters are stacked along dim 0 and trained with the batched forward and backward of
network.py, without autograd when the loss gives its logit gradient in closed form; SGD,
momentum and Adam update the stacks in place with checkpointable state. `fit` trains towards a
stationary point (annealed learning rate, an L2 term, a stopping rule on gradient norms).
Docs: docs/meta_learning.md ("Training the inner networks to a stationary point").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import zoo
from .network import BatchedMLP, Params, batched_view, view_of
from .network import mlp as mlp  # the base network, defined in network.py

LossFn = Callable[..., Tensor]
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "linear")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def init_params(model: nn.Sequential, seeds: Sequence[int], device: torch.device) -> Params:
    """Fresh weights for one network per seed (Algorithm 1, line 9), stacked along dim 0.

    Each network gets the model's own initialisation drawn on the CPU from its seed, so the
    same seed gives the same network on every device. The model must be a base network `mlp`.
    """
    view = batched_view(model)  # fails on a layer the batched loop has no rule for
    stacked: Dict[str, List[Tensor]] = {name: [] for name, _ in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.default_generator.manual_seed(seed)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            for name, p in model.named_parameters():
                stacked[name].append(p.detach().clone())
    params = {name: torch.stack(ps).to(device) for name, ps in stacked.items()}
    if view_of(params) != view:
        raise ValueError(f"the inner loop trains the base network mlp(...), not {model}")
    return params


def mlp_forward(params: Params, x: Tensor) -> Tensor:
    """Logits (n, batch, classes) of the n stacked MLPs of `mlp` on inputs x (n, batch, features)."""
    return view_of(params).activations(params, x)[-1]


def flat(params: Params) -> Tensor:
    """The stacked parameters as rows θ_i, in `flatten_module`'s order (n, parameters)."""
    return view_of(params).flat(params)


class InnerOptimizer:
    """SGD, heavy-ball momentum (PyTorch's convention) or Adam on stacked parameters, in place.

    `init_state(params)` makes the state (moment buffers and the step count); `step` updates
    parameters and state in place. All networks of a stack share the step count.
    """

    def __init__(self, name: str = "sgd", lr: float = 0.01, momentum: float = 0.9):
        if name not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {name!r}; expected one of "
                             f"{', '.join(INNER_OPTIMIZERS)}")
        self.name, self.lr, self.momentum = name, lr, momentum

    def init_state(self, params: Params) -> Dict[str, object]:
        """Zero moment buffers shaped like `params` and a step count of 0."""
        buffers = {"sgd": (), "momentum": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}[self.name]
        state: Dict[str, object] = {"step": 0}
        for b in buffers:
            state[b] = {name: torch.zeros_like(p) for name, p in params.items()}
        return state

    def step(self, params: Params, grads: Params, state: Dict[str, object],
             lr: Optional[float] = None) -> None:
        """One update of every stacked network, at learning rate `lr` (None: the optimiser's)."""
        lr = self.lr if lr is None else lr
        state["step"] = int(state["step"]) + 1
        if self.name == "sgd":
            for name, p in params.items():
                p.add_(grads[name], alpha=-lr)
        elif self.name == "momentum":
            for name, p in params.items():
                buf = state["momentum"][name].mul_(self.momentum).add_(grads[name])
                p.add_(buf, alpha=-lr)
        else:
            b1, b2 = ADAM_BETAS
            t = state["step"]
            step_size = lr / (1 - b1 ** t)
            root_correction = math.sqrt(1 - b2 ** t)
            for name, p in params.items():
                m = state["exp_avg"][name].mul_(b1).add_(grads[name], alpha=1 - b1)
                v = state["exp_avg_sq"][name].mul_(b2).addcmul_(grads[name], grads[name], value=1 - b2)
                p.addcdiv_(m, (v.sqrt() / root_correction).add_(ADAM_EPS), value=-step_size)


LossAndGrad = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def learning_rates(schedule: str, lr: float, steps: int) -> Optional[List[float]]:
    """The learning rate of each of `steps` steps: None for "constant" (η throughout), else η
    annealed to 0 over the steps: "cosine" η(1 + cos(πt/steps))/2, "linear" η(1 − t/steps)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown inner schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return [lr * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    return [lr * (1 - t / steps) for t in range(steps)]



def _cross_entropy_and_grad(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """Cross-entropy -log ŷ_t per sample and its gradient ŷ - onehot(t), in closed form."""
    log_probs = logits.log_softmax(dim=1)
    index = target.unsqueeze(1)
    return -log_probs.gather(1, index).squeeze(1), log_probs.exp().scatter_add_(
        1, index, torch.full_like(log_probs[:, :1], -1.0))


# Plain loss functions whose gradient is known in closed form.
_CLOSED_FORM: Tuple[Tuple[LossFn, LossAndGrad], ...] = (
    (F.cross_entropy, _cross_entropy_and_grad), (zoo.cross_entropy, _cross_entropy_and_grad))


def loss_and_grad(loss: LossFn) -> LossAndGrad:
    """(logits, target) -> (per-sample losses (N,), ∂loss_i/∂logits_i (N, classes)) for `loss`.

    In closed form, without autograd, when the loss has a `loss_and_grad` method (TaylorLoss)
    or is cross-entropy; otherwise by autograd through `loss(logits, target, reduction="none")`.
    """
    if hasattr(loss, "loss_and_grad"):
        return loss.loss_and_grad
    closed = next((f for known, f in _CLOSED_FORM if known is loss), None)
    if closed is not None:
        return closed

    def by_autograd(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            values = loss(leaf, target, reduction="none")
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        return values.detach(), grad

    return by_autograd



def _step(view: BatchedMLP, params: Params, loss: LossAndGrad, optimizer: InnerOptimizer,
          state: Dict[str, object], x: Tensor, y: Tensor, lr: Optional[float] = None,
          weight_decay: float = 0.0) -> Tensor:
    """One optimiser step of every stacked network on x (n, batch, features), y (n·batch,);
    returns the per-example losses (n, batch). Forward and backward are `view`'s batched
    products; for SGD the update is fused into the weight-gradient product.

    lr: this step's learning rate (None: the optimiser's); weight_decay λ adds λθ, the gradient
    of λ/2‖θ‖², to every parameter's gradient."""
    n, batch = x.shape[:2]
    lr = optimizer.lr if lr is None else lr
    outs = view.activations(params, x)
    values, dz = loss(outs[-1].view(n * batch, -1), y)
    dz = dz.reshape(n, batch, -1) / batch  # ∂(mean loss)/∂logits; the loss's own tensor is never written
    if optimizer.name == "sgd":
        view.backward(params, outs, dz, lr, weight_decay)
        state["step"] = int(state["step"]) + 1
    else:
        grads = view.backward(params, outs, dz)
        if weight_decay:
            grads = {name: g.add(params[name], alpha=weight_decay) for name, g in grads.items()}
        optimizer.step(params, grads, state, lr)
    return values.view(n, batch)


def train(params: Params, loss: LossFn, optimizer: InnerOptimizer, state: Dict[str, object],
          x: Tensor, y: Tensor, batches: Tensor, batched: bool = True,
          lrs: Optional[Sequence[float]] = None, weight_decay: float = 0.0) -> Tensor:
    """Train the stacked MLPs in place; network i takes minibatch batches[i, t] at step t.

    x, y: all examples; batches: (n, steps, batch) indices into them. `batched=False` trains
    the networks one after another (less memory, the same arithmetic). `loss` is called like
    F.cross_entropy, or gives its gradient in closed form (`loss_and_grad`). lrs: the learning
    rate of each step (None: the optimiser's); weight_decay: λ of the objective's λ/2‖θ‖².
    Returns the training loss (without the L2 term) of every network at every step, (n, steps).
    """
    n, steps, batch = batches.shape
    losses = torch.empty(n, steps, device=x.device, dtype=x.dtype)
    start = int(state["step"])
    groups = [slice(0, n)] if batched else [slice(i, i + 1) for i in range(n)]
    closed, view = loss_and_grad(loss), view_of(params)
    with torch.no_grad():
        for group in groups:
            sub = {name: p[group] for name, p in params.items()}  # views: updated in place
            sub_state = {k: ({name: b[group] for name, b in v.items()} if isinstance(v, dict)
                             else v) for k, v in state.items()}
            sub_state["step"] = start
            order = batches[group].transpose(0, 1).contiguous()  # (steps, networks, batch)
            targets = y[order]
            per_step = [_step(view, sub, closed, optimizer, sub_state,
                              x.index_select(0, order[t].view(-1)).view(*order[t].shape, -1),
                              targets[t].view(-1), None if lrs is None else lrs[t], weight_decay)
                        for t in range(steps)]
            losses[group] = torch.stack(per_step, dim=1).mean(2)
    state["step"] = start + steps
    return losses


def stacked_grad_norms(params: Params, loss: LossFn, x: Tensor, y: Tensor, index: Sequence[Tensor],
               weight_decay: float = 0.0) -> Tensor:
    """‖∂(L + λ/2‖θ‖²)/∂θ‖ of each stacked network i on its examples index[i], (n,): how far
    network i is from a stationary point of its (mean) training objective (the stopping rule's
    measure; diagnostics.inner_grad_norms computes it on flat θ through torch.func)."""
    norms = []
    with torch.enable_grad():
        for i, idx in enumerate(index):
            leaves = [p[i:i + 1].detach().requires_grad_() for p in params.values()]
            logits = mlp_forward(dict(zip(params, leaves)), x[idx].unsqueeze(0))[0]
            grads = torch.autograd.grad(loss(logits, y[idx], reduction="none").mean(), leaves)
            if weight_decay:
                grads = [g + weight_decay * p for g, p in zip(grads, leaves)]
            norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    return torch.stack(norms).detach()


@dataclass(frozen=True)
class StopRule:
    """Stop network i at the first check, every `every` steps, where its gradient norm on its
    fixed check examples is at most `ratio` times the norm there at the start of its training."""

    ratio: float
    every: int


@dataclass
class InnerRun:
    """What `fit` did: the training loss of every network at every step (n, cap), NaN after a
    network stopped; the steps each network took; and, with a stopping rule, the gradient norms
    on the check examples at the start and at the end (None without one)."""

    losses: Tensor
    steps_used: List[int]
    start_norm: Optional[Tensor] = None
    final_norm: Optional[Tensor] = None


def _rows(tree: Dict[str, object], rows: Tensor) -> Dict[str, object]:
    """Copies of rows `rows` (an index on the tensors' device) of every stacked tensor in a
    parameter or optimiser-state dict."""
    return {k: (_rows(v, rows) if isinstance(v, dict) else v[rows] if isinstance(v, Tensor) else v)
            for k, v in tree.items()}


def _put_rows(tree: Dict[str, object], rows: Tensor, sub: Dict[str, object]) -> None:
    """Write `sub` (from `_rows(tree, rows)`) back into rows `rows` of `tree`'s tensors."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _put_rows(v, rows, sub[k])
        elif isinstance(v, Tensor):
            v[rows] = sub[k]


def train_until_stationary(params: Params, loss: LossFn, optimizer: InnerOptimizer,
                           state: Dict[str, object], x: Tensor, y: Tensor, batches: Tensor,
                           check: Sequence[Tensor], rule: StopRule, batched: bool = True,
                           lrs: Optional[Sequence[float]] = None,
                           weight_decay: float = 0.0) -> InnerRun:
    """`train` for at most batches.shape[1] steps, each network until `rule` stops it.

    check[i]: the fixed examples of network i's gradient norm. The networks still training
    are trained together as one stack (or one by one with batched=False) between checks; one
    that has stopped is left out, so its parameters and optimiser state stop changing. The
    host waits for the device only at checks. The optimiser's step count (Adam's bias
    correction) is shared: at the end it counts the longest-training network's steps.
    """
    n, cap, _ = batches.shape
    start_norm = stacked_grad_norms(params, loss, x, y, check, weight_decay)
    final_norm = start_norm.clone()
    losses = torch.full((n, cap), math.nan, device=x.device, dtype=x.dtype)
    used, start = [cap] * n, int(state["step"])
    for group in ([list(range(n))] if batched else [[i] for i in range(n)]):
        active, t = group, 0
        while active and t < cap:
            k = min(rule.every, cap - t)
            rows = torch.tensor(active, device=x.device)  # one index for every tensor of the check
            sub, sub_state = _rows(params, rows), _rows(state, rows)
            sub_state["step"] = start + t
            losses[rows, t:t + k] = train(sub, loss, optimizer, sub_state, x, y,
                                          batches[rows, t:t + k], True,
                                          None if lrs is None else lrs[t:t + k], weight_decay)
            _put_rows(params, rows, sub)
            _put_rows(state, rows, sub_state)
            t += k
            norms = stacked_grad_norms(_rows(params, rows), loss, x, y, [check[i] for i in active],
                               weight_decay)
            final_norm[rows] = norms
            stopped = (norms <= rule.ratio * start_norm[rows]).tolist()  # the host waits here
            for i, s in zip(active, stopped):
                used[i] = t if s else used[i]
            active = [i for i, s in zip(active, stopped) if not s]
    state["step"] = start + max(used)
    return InnerRun(losses, used, start_norm, final_norm)


def fit(params: Params, loss: LossFn, optimizer: InnerOptimizer, state: Dict[str, object],
        x: Tensor, y: Tensor, batches: Tensor, check: Sequence[Tensor], batched: bool = True,
        lrs: Optional[Sequence[float]] = None, weight_decay: float = 0.0,
        rule: Optional[StopRule] = None) -> InnerRun:
    """Train the stacked MLPs in place for batches.shape[1] steps (`train`), or, with a stopping
    `rule`, until it stops each one (`train_until_stationary`, gradient norms on `check`)."""
    if rule is None:
        losses = train(params, loss, optimizer, state, x, y, batches, batched, lrs, weight_decay)
        return InnerRun(losses, [batches.shape[1]] * batches.shape[0])
    return train_until_stationary(params, loss, optimizer, state, x, y, batches, check, rule,
                                  batched, lrs, weight_decay)


def tail_loss(losses: Tensor, steps_used: Sequence[int]) -> Tensor:
    """Each network's mean training loss over the last tenth (at least one) of its steps, (n,)."""
    cap = losses.shape[1]
    if all(u == cap for u in steps_used):
        return losses[:, -max(1, cap // 10):].mean(1)
    return torch.stack([losses[i, u - max(1, u // 10):u].mean() for i, u in enumerate(steps_used)])


def predict(params: Params, x: Tensor, chunk: Optional[int] = 4096) -> Tensor:
    """Logits of the n stacked networks on the same inputs x (m, features): (n, m, classes)."""
    n = next(iter(params.values())).shape[0]
    with torch.no_grad():
        parts = [mlp_forward(params, part.unsqueeze(0).expand(n, -1, -1))
                 for part in (x.split(chunk) if chunk else [x])]
    return torch.cat(parts, dim=1)
