"""The implicit hypergradient dM/dω at an inner optimum θ*(ω) (Sec. 3.2, Eq. 4-5, Algorithm 2).

As JAXopt's root_vjp: vector-Jacobian products of the inner gradient (torch.func), never a
dense Hessian. `flatten_module` gives any nn.Module as a flat θ and a pure apply(θ, x); the
inner loop's batched view of the base network is checked against it (network.py).
Docs: docs/meta_learning.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from .solvers import Solver


def implicit_grad(inner_grad: Callable[[Tensor, Tensor], Tensor], theta: Tensor, omega: Tensor,
                  v: Tensor, solve: Solver,
                  return_adjoint: bool = False) -> Tensor | Tuple[Tensor, Tensor]:
    """dM/dω for M(θ*(ω)) with v = ∂M/∂θ at θ*, where inner_grad(θ, ω) = ∂L_ω/∂θ vanishes at θ*.

    θ, v and ω are flat 1-D tensors and the result has ω's shape; `solve(matvec, b)` approximates
    (Hᵀ)⁻¹ b from products with Hᵀ (see solvers.py). M must not depend on ω directly.
    `return_adjoint=True` also returns u = solve(Hᵀ, −v), e.g. to measure the solve's residual.
    """
    # Eq. 4-5 (IFT), H = ∂²L/∂θ∂θᵀ: dθ*/dω = −H⁻¹ ∂²L/∂θ∂ω, so dM/dω = uᵀ ∂²L/∂θ∂ω with Hᵀu = −v.
    _, hessian_t = vjp(lambda t: inner_grad(t, omega), theta)
    u = solve(lambda w: hessian_t(w)[0], -v)
    _, mixed_t = vjp(lambda o: inner_grad(theta, o), omega)
    return (mixed_t(u)[0], u) if return_adjoint else mixed_t(u)[0]


def adjoint_residual(inner_grad: Callable[[Tensor, Tensor], Tensor], theta: Tensor, omega: Tensor,
                     v: Tensor, u: Tensor) -> Tensor:
    """‖Hᵀu + v‖ / ‖v‖: how far u is from solving Hᵀu = −v, the linear system of implicit_grad."""
    _, hessian_t = vjp(lambda t: inner_grad(t, omega), theta)
    return (hessian_t(u)[0] + v).norm() / v.norm()


def flatten_module(module: nn.Module) -> Tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """(θ, apply): the module's parameters as one flat detached vector, and apply(θ, x) = module(x)
    with the parameters taken from θ (torch.func.functional_call; buffers stay the module's own)."""
    named = list(module.named_parameters())
    if not named:
        raise ValueError(f"{type(module).__name__} has no parameters to flatten")
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    buffers: Dict[str, Tensor] = dict(module.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def apply(flat: Tensor, x: Tensor) -> Tensor:
        if flat.shape != theta.shape:
            raise ValueError(f"expected a flat parameter vector of shape {tuple(theta.shape)}, "
                             f"got {tuple(flat.shape)}")
        params = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(module, {**params, **buffers}, (x,))

    return theta, apply
