"""The top Hessian eigenvector of a training loss and the 1-D landscape along it (Fig. 8).

See docs/analyses.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

LossFn = Callable[..., Tensor]
Batch = Tuple[Tensor, Tensor]
MatVec = Callable[[Tensor], Tensor]


class FlatParameters:
    """The trainable parameters of `module` as one flat vector, and back."""

    def __init__(self, module: nn.Module):
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(module).__name__} has no trainable parameter")
        self.module = module
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflatten(self, theta: Tensor) -> Dict[str, Tensor]:
        """{parameter name: tensor} with the values of the flat vector `theta`."""
        return {name: chunk.view(shape) for name, chunk, shape
                in zip(self.names, theta.split(self.sizes), self.shapes)}

    def outputs(self, theta: Tensor, x: Tensor) -> Tensor:
        """module(x) with its parameters set to `theta` (buffers as they are)."""
        return functional_call(self.module, self.unflatten(theta), (x,))


def batch_loss(flat: FlatParameters, loss: LossFn, batch: Batch) -> Callable[[Tensor], Tensor]:
    """θ -> mean loss of the module with parameters θ on one (x, y) batch."""
    x, y = batch
    return lambda theta: loss(flat.outputs(theta, x), y)


def _weights(batches: Sequence[Batch]) -> List[float]:
    sizes = [len(y) for _, y in batches]
    if not sizes or min(sizes) == 0:
        raise ValueError("need at least one non-empty batch")
    return [n / sum(sizes) for n in sizes]


def mean_loss(flat: FlatParameters, loss: LossFn, batches: Sequence[Batch], theta: Tensor) -> Tensor:
    """The loss at θ over all `batches` (each batch weighted by its size), without gradients."""
    with torch.no_grad():
        return sum(w * batch_loss(flat, loss, b)(theta) for w, b in zip(_weights(batches), batches))


def hessian_vector_product(flat: FlatParameters, loss: LossFn, batches: Sequence[Batch],
                           theta: Tensor) -> MatVec:
    """v -> H v, H the Hessian at θ of the size-weighted mean loss over `batches`.

    Each product is Σ_b w_b jvp(grad(L_b), θ, v): forward-over-reverse, one batch at a time, so
    memory grows with the batch and not with the number of samples.
    """
    weights = _weights(batches)
    grads = [grad(batch_loss(flat, loss, b)) for b in batches]

    def matvec(v: Tensor) -> Tensor:
        return sum(w * jvp(g, (theta,), (v,))[1] for w, g in zip(weights, grads))

    return matvec


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz values (ascending) and unit Ritz vectors (rows) of a symmetric operator."""

    values: Tensor
    vectors: Tensor
    steps: int

    def top(self) -> Tuple[float, Tensor]:
        """The algebraically largest Ritz value and its vector."""
        return float(self.values[-1]), self.vectors[-1]


def lanczos(matvec: MatVec, v0: Tensor, steps: int, tol: float = 1e-10) -> Eigenpairs:
    """Ritz pairs of the symmetric operator `matvec` after `steps` Lanczos iterations from `v0`.

    Full reorthogonalisation (twice, against every stored vector) keeps the basis orthonormal
    in floating point, at the memory of `steps` vectors. The iteration stops early when the
    Krylov space becomes invariant (β < tol·|T|), in which case the Ritz pairs are exact.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    norm = v0.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the start vector must be finite and non-zero")
    basis = [v0 / norm]
    alphas: List[float] = []
    betas: List[float] = []
    for k in range(min(steps, v0.numel())):
        w = matvec(basis[k])
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"the Hessian-vector product is not finite at Lanczos step {k}")
        alphas.append(float(w @ basis[k]))
        for _ in range(2):
            for q in basis:
                w = w - (w @ q) * q
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas + betas) or 1.0
        if k == min(steps, v0.numel()) - 1 or beta < tol * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    return ritz_pairs(alphas, betas, basis)


def ritz_pairs(alphas: Sequence[float], betas: Sequence[float], basis: Sequence[Tensor]) -> Eigenpairs:
    """The Ritz pairs of the Lanczos tridiagonal (diagonal `alphas`, off-diagonal `betas`) in the
    orthonormal `basis` (one vector per alpha). The small tridiagonal problem is solved on the
    CPU in float64; the values and vectors follow the basis's device and dtype."""
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(betas):
        off = torch.tensor(list(betas), dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, coefficients = torch.linalg.eigh(tridiagonal)
    q = torch.stack(list(basis))
    vectors = coefficients.T.to(q) @ q
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return Eigenpairs(values.to(q), vectors, len(alphas))


def residual(matvec: MatVec, value: float, vector: Tensor) -> float:
    """‖H v - λ v‖ / max(|λ|, tiny): how far (λ, v) is from an eigenpair."""
    return float((matvec(vector) - value * vector).norm()) / max(abs(value), 1e-30)


def landscape_1d(loss_at: Callable[[Tensor], Tensor], theta: Tensor, direction: Tensor,
                 ts: Sequence[float]) -> List[float]:
    """[loss_at(θ + t·d) for t in ts]: the 1-D slice of a loss through θ along `direction`."""
    values = []
    for t in ts:
        value = float(loss_at(theta + float(t) * direction))
        values.append(value if math.isfinite(value) else math.nan)
    return values
