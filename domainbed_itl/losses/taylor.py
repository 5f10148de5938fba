"""The Taylor-polynomial loss family of Gao et al. (2022), Sec. 3.4 and Appendix A.1.

See docs/losses.md.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_kernel

MIN_ORDER = 2
MAX_ORDER = 5

# Eq. 10's mixed terms (ŷ-ω0)^i (y-ω1)^j, in Eq. 10's order (ω6..ω11).
_EQ10_MIXED: Tuple[Tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2))

# Table 8: the learned ITL loss, read as ω0..ω11 of Eq. 10.
ITL_PARAMETERS: Tuple[float, ...] = (
    -2.0193, -1.2234, 0.1363, 0.1269, -0.4566, -0.1016,
    -0.2545, 1.0971, -0.9203, 0.2368, 0.4795, 0.9975,
)


def _check_order(order: int) -> None:
    if not isinstance(order, int) or isinstance(order, bool) or not MIN_ORDER <= order <= MAX_ORDER:
        raise ValueError(
            f"Taylor order must be an integer in [{MIN_ORDER}, {MAX_ORDER}], got {order!r}")


def taylor_terms(order: int) -> List[Tuple[int, int]]:
    """Exponents (i, j) of the terms ω_k (ŷ-ω0)^i (y-ω1)^j, in parameter order ω2, ω3, ...

    Pure ŷ terms (i, 0) for i = 1..order come first, then Eq. 10's mixed terms of degree
    <= order in Eq. 10's order, then (order 5 only) the degree-5 mixed terms by ascending i.
    For order 4 this is exactly Eq. 10.
    """
    _check_order(order)
    terms = [(i, 0) for i in range(1, order + 1)]
    terms += [t for t in _EQ10_MIXED if sum(t) <= order]
    terms += [(i, 5 - i) for i in range(1, 5)] if order >= 5 else []
    return terms


def num_taylor_params(order: int) -> int:
    """Number of parameters (ω0, ω1 and one weight per term) of the order-`order` family."""
    return 2 + len(taylor_terms(order))


def check_taylor_params(omega: Sequence[float] | Tensor, order: int) -> None:
    """Raise ValueError unless `omega` has exactly num_taylor_params(order) entries."""
    expected = num_taylor_params(order)
    n = omega.numel() if isinstance(omega, Tensor) else len(omega)
    if n != expected:
        raise ValueError(
            f"a Taylor loss of order {order} has {expected} parameters, got {n}")


def check_finite_taylor_params(omega: Sequence[float], order: int) -> None:
    """Raise ValueError naming the first entry of `omega` that is not a finite number (a fixed
    loss; the meta-learner's ω is checked by its family and the trainer)."""
    check_taylor_params(omega, order)
    for k, value in enumerate(omega):
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)) or not math.isfinite(value):
            raise ValueError(f"omega{k} of a Taylor loss of order {order} must be a finite number, "
                             f"got omega{k}={value!r}")


def cross_entropy_taylor_init(order: int, num_classes: int) -> List[float]:
    """ω of the order-`order` Taylor expansion of cross-entropy, the default meta-learning start.

    C·y·log ŷ expanded around (ŷ, y) = (1, 0) keeps only the terms (i, 1), with weight
    C·(-1)^(i+1)/i for i = 1..order-1, so that -(1/C) Σ_c ℓ = -T(ŷ_true) ≈ -log ŷ_true.
    """
    terms = taylor_terms(order)
    omega = [1.0, 0.0] + [0.0] * len(terms)
    for i in range(1, order):
        omega[2 + terms.index((i, 1))] = num_classes * (-1.0) ** (i + 1) / i
    return omega


def _check_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if target.dtype not in (torch.int64, torch.int32) or target.shape != logits.shape[:1]:
        raise ValueError(
            "target must hold integer class indices of shape (batch,), got dtype "
            f"{target.dtype} and shape {tuple(target.shape)}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def taylor_loss_reference(logits: Tensor, target: Tensor, omega: Tensor, order: int,
                          reduction: str = "mean") -> Tensor:
    """Eq. 8-10 evaluated term by term: -(1/C) Σ_c Σ_k ω_k (ŷ_c-ω0)^i (y_c-ω1)^j. Test oracle."""
    _check_target(logits, target)
    check_taylor_params(omega, order)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).to(probs.dtype)
    du, dv = probs - omega[0], onehot - omega[1]
    ell = sum(omega[2 + k] * du ** i * dv ** j for k, (i, j) in enumerate(taylor_terms(order)))
    return _reduce(-ell.mean(dim=1), reduction)


def _label_coefficients(omega: Tensor, order: int) -> Tuple[Tensor, Tensor]:
    """c[y][i-1] = Σ_j ω_(i,j) (y-ω1)^j for y = 0 and y = 1: ℓ(ŷ, y) = Σ_i c[y][i-1] (ŷ-ω0)^i."""
    terms = taylor_terms(order)
    rows = []
    for y in (0.0, 1.0):
        dv = y - omega[1]
        rows.append(torch.stack([
            sum(omega[2 + k] * dv ** j for k, (i, j) in enumerate(terms) if i == deg)
            for deg in range(1, order + 1)]))
    return rows[0], rows[1]


def _horner(u: Tensor, coefficients: Tensor) -> Tensor:
    """Σ_{i>=1} coefficients[i-1] u^i by Horner's scheme."""
    acc = coefficients[-1] * u
    for c in coefficients.flip(0)[1:]:
        acc = (acc + c) * u
    return acc


def taylor_loss(logits: Tensor, target: Tensor, omega: Tensor, order: int,
                reduction: str = "mean") -> Tensor:
    """The minimised Taylor loss -(1/C) Σ_c ℓ_ω (Eq. 8-10), differentiable in logits and ω.

    Since y is one-hot, Σ_c ℓ(ŷ_c, y_c) = Σ_c P0(ŷ_c) + P1(ŷ_t) - P0(ŷ_t) with P_y = ℓ(·, y)
    and t the true class; each P_y is evaluated by Horner's scheme in (ŷ - ω0).
    """
    _check_target(logits, target)
    check_taylor_params(omega, order)
    c0, c1 = _label_coefficients(omega, order)
    u = logits.softmax(dim=1) - omega[0]
    u_true = u.gather(1, target.long().unsqueeze(1)).squeeze(1)
    score = _horner(u, c0).sum(dim=1) + _horner(u_true, c1) - _horner(u_true, c0)
    return _reduce(-score / logits.shape[1], reduction)


def _power_coefficients(omega: Sequence[float], order: int) -> Tuple[List[float], List[float]]:
    """Coefficients a_k of P0(ŷ) = Σ_k a_k ŷ^k and d_k of P1 - P0, k = 0..order (float64)."""
    w = torch.tensor(omega, dtype=torch.float64)
    c0, c1 = _label_coefficients(w, order)
    out = []
    try:
        for c in (c0, c1 - c0):
            a = [0.0] * (order + 1)
            for i, ci in enumerate(c.tolist(), start=1):
                for k in range(i + 1):  # (ŷ - ω0)^i = Σ_k binom(i, k) ŷ^k (-ω0)^(i-k)
                    a[k] += ci * math.comb(i, k) * (-float(w[0])) ** (i - k)
            out.append(a)
    except OverflowError:
        out = [[math.inf]]
    if not all(math.isfinite(v) for a in out for v in a):
        largest = max(omega, key=lambda v: abs(float(v)))
        raise ValueError(f"the Taylor loss's parameters are too large to compute with (the largest "
                         f"is {float(largest):g}; its polynomial's coefficients overflow 64-bit "
                         "floats); expected parameters of a moderate size")
    return out[0], out[1]


def _fixed_taylor(logits: Tensor, target: Tensor, m: Tensor, constant: float,
                  need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample loss -(1/C)[Σ_c P0(ŷ_c) + D(ŷ_t)] and, if asked, its closed-form logit gradient.

    V = (ŷ, ŷ², ..., ŷ^β) per class by one cumprod; one matmul with m (β, 4) gives, for every
    class, P0(ŷ_c), ŷ_c P0'(ŷ_c), D(ŷ_c) and ŷ_c D'(ŷ_c) (D = P1 - P0; constants and the -1/C
    scale are folded into m and `constant`), and the true class's D terms are added to its P0
    terms. Through the softmax, dloss/dz = ŷ ⊙ (g - <g, ŷ>) = R - ŷ·Σ_c R_c, with R_c = ŷ_c P0'(ŷ_c)
    plus, at the true class, ŷ_t D'(ŷ_t). Eight kernels in all; the gradient shares every
    intermediate with the value.
    """
    probs = logits.softmax(dim=1)
    e = probs.unsqueeze(-1).expand(-1, -1, m.shape[0]).cumprod(dim=-1) @ m
    index = target.view(-1, 1, 1).expand(-1, 1, 2)
    per_class = e[..., :2].scatter_add_(1, index, e[..., 2:].gather(1, index))
    sums = per_class.sum(dim=1)
    value = sums[:, 0] + constant
    if not need_grad:
        return value, None
    return value, torch.addcmul(per_class[..., 1], probs, sums[:, 1:], value=-1.0)


class _FixedTaylorLoss(torch.autograd.Function):
    """`_fixed_taylor` as an autograd function: the gradient is computed in the forward pass and
    only scaled in the backward pass. `kernel`, when given, is the compiled C++ version of the
    same computation (cpu_kernel.py), for CPU tensors."""

    @staticmethod
    def forward(ctx, logits, target, m0, md, m, constant, kernel):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        if kernel is not None:
            value, grad = kernel.taylor_forward(logits, target, m0, md, constant, need_grad)
        else:
            value, grad = _fixed_taylor(logits, target, m, constant, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1), None, None, None, None, None, None


class TaylorLoss(torch.nn.Module):
    """A fixed Taylor loss (e.g. ITL) as a drop-in replacement for F.cross_entropy.

    forward(logits, target, reduction="mean") -> -(1/C) Σ_c ℓ_ω(softmax(logits)_c, onehot_c),
    computed with a fused closed-form gradient; ω is a buffer, not trained. The gradient is
    first-order only (double backward raises); use `taylor_loss` where second order is needed.
    backend: "auto" (the default) runs the pure-torch fused ops, or on CPU tensors the compiled
    C++ kernel when DOMAINBED_ITL_CPU_KERNEL=1 and it can be built (see cpu_kernel.py: it is
    compiled on first use, so it is opt-in); "cpp" requires the kernel on CPU tensors; "torch"
    never uses it. Other devices always use the torch ops.
    """

    BACKENDS = ("auto", "cpp", "torch")

    def __init__(self, parameters: Sequence[float] = ITL_PARAMETERS, order: int = 4,
                 backend: str = "auto"):
        super().__init__()
        _check_order(order)
        check_finite_taylor_params(parameters, order)
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(self.BACKENDS)}, got {backend!r}")
        self.order, self.backend = order, backend
        # Not in state_dict: the loss is fixed at construction (a DomainBed model's loss comes from
        # its hparams), so checkpoints of e.g. RSC_ITL load into RSC and vice versa.
        self.register_buffer("omega", torch.tensor([float(v) for v in parameters]), persistent=False)
        p0, d = _power_coefficients([float(v) for v in parameters], order)
        # Columns: the polynomial's value without its constant, and ŷ times its derivative.
        for name, c in (("_m0", p0), ("_md", d)):
            self.register_buffer(name, torch.tensor([[c[k], k * c[k]] for k in range(1, order + 1)],
                                                    dtype=torch.float64), persistent=False)
        self._constants = (p0[0], d[0])
        self._folded: dict = {}

    def _operands(self, logits: Tensor, target: Tensor) -> tuple:
        """(m0, md, m, constant, kernel) for these logits: the coefficient tables with the -1/C
        scale folded in, in the logits' dtype and device (cached), and the C++ kernel or None."""
        _check_target(logits, target)
        key = (logits.dtype, logits.device, logits.shape[1])
        if key not in self._folded:
            scale = -1.0 / logits.shape[1]
            constant = scale * (logits.shape[1] * self._constants[0] + self._constants[1])
            m0, md = self._m0.to(logits) * scale, self._md.to(logits) * scale
            self._folded = {key: (m0, md, torch.cat([m0, md], dim=1), constant)}
        kernel = None
        if logits.device.type == "cpu" and (self.backend == "cpp" or
                                            (self.backend == "auto" and cpu_kernel.enabled())):
            kernel = cpu_kernel.load()
            if kernel is None and self.backend == "cpp":
                raise RuntimeError(f"the C++ Taylor-loss kernel is unavailable: {cpu_kernel.load_error()}")
        return (*self._folded[key], kernel)

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of `logits` (batch, classes) for integer `target` (batch,)."""
        per_sample = _FixedTaylorLoss.apply(logits, target.long(), *self._operands(logits, target))
        return _reduce(per_sample, reduction)

    def loss_and_grad(self, logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """(per-sample losses (batch,), their closed-form gradients ∂loss_b/∂logits_b (batch,
        classes)), without autograd: what a hand-written training loop needs from the loss."""
        m0, md, m, constant, kernel = self._operands(logits, target)
        target = target.long()
        if kernel is not None:
            value, grad = kernel.taylor_forward(logits, target, m0, md, constant, True)
            return value, grad
        return _fixed_taylor(logits, target, m, constant, True)

    def extra_repr(self) -> str:
        return (f"order={self.order}, omega={[round(v, 4) for v in self.omega.tolist()]}, "
                f"backend={self.backend}")
