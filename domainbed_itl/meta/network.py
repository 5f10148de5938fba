"""The base network, defined once (`mlp`), and its batched view for the inner loop.

The inner loop trains n networks as one stack (`BatchedMLP`, batched matrix products); the
hypergradient computes one network as `flatten_module`'s pure function of a flat θ. The batched
view is derived from the module's layers and checked against the functional one (parameter
order, logits, gradients) the first time each architecture is used. Docs: docs/meta_learning.md
("The base network").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from .hypergradient import flatten_module

Params = Dict[str, Tensor]
Shapes = Tuple[Tuple[str, Tuple[int, ...]], ...]


def mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """The base network: Linear-ReLU blocks of widths `hidden`, then a linear classifier."""
    widths = [in_features, *hidden]
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


@dataclass(frozen=True)
class Activation:
    """A pointwise layer of the batched view: `forward(z)` in place, and `backward(g, out)`,
    the gradient at its input from g at its output `out`."""

    name: str
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]


def _relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(grad, out, 0)


ACTIVATIONS: Dict[type, Activation] = {nn.ReLU: Activation("relu", Tensor.relu_, _relu_backward)}


@dataclass(frozen=True)
class Affine:
    """One nn.Linear of the module: its parameters' names and the activation after it, if any."""

    weight: str
    bias: str
    activation: Optional[Activation] = None


@dataclass(frozen=True)
class BatchedMLP:
    """n networks of one architecture with parameters stacked along dim 0: `layers` in order,
    and the parameters' names and shapes in the module's `named_parameters` order, which is
    `flatten_module`'s order and `flat`'s."""

    layers: Tuple[Affine, ...]
    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    def activations(self, params: Params, x: Tensor) -> List[Tensor]:
        """x (n, batch, features) and every layer's output after its activation; the last are
        the logits (n, batch, classes). One batched product per layer."""
        outs = [x]
        for layer in self.layers:
            z = torch.baddbmm(params[layer.bias].unsqueeze(1), outs[-1],
                              params[layer.weight].transpose(1, 2))
            outs.append(z if layer.activation is None else layer.activation.forward(z))
        return outs

    def backward(self, params: Params, outs: Sequence[Tensor], grad: Tensor,
                 lr: Optional[float] = None, weight_decay: float = 0.0) -> Params:
        """∂(Σ grad·logits)/∂θ of every network, from `activations`' outputs and grad (n, batch,
        classes): two batched products per layer (one for the first). With `lr`, instead the SGD
        step θ ← (1 − ηλ)θ − η·that in place, fused into the weight-gradient products; {}."""
        grads: Params = {}
        for k in reversed(range(len(self.layers))):
            layer = self.layers[k]
            if layer.activation is not None:
                grad = layer.activation.backward(grad, outs[k + 1])
            w, b = params[layer.weight], params[layer.bias]
            dh = torch.bmm(grad, w) if k else grad  # before w changes
            if lr is None:
                grads[layer.weight] = torch.bmm(grad.transpose(1, 2), outs[k])
                grads[layer.bias] = grad.sum(1)
            else:  # Algorithm 1, line 11: θ ← θ − η ∂L/∂θ
                if weight_decay:  # θ − η(∂L/∂θ + λθ) = (1 − ηλ)θ − η ∂L/∂θ
                    w.mul_(1 - lr * weight_decay)
                    b.mul_(1 - lr * weight_decay)
                w.baddbmm_(grad.transpose(1, 2), outs[k], alpha=-lr)
                b.sub_(grad.sum(1), alpha=lr)
            grad = dh
        return grads

    def flat(self, params: Params) -> Tensor:
        """The stacked parameters as rows θ_i in `flatten_module`'s order, (n, parameters)."""
        n = params[self.names[0]].shape[0]
        return torch.cat([params[name].reshape(n, -1) for name in self.names], dim=1)


def batched_view(module: nn.Module) -> BatchedMLP:
    """The batched view of `module`, read off its layers: an nn.Sequential of nn.Linear layers
    (with bias), each followed by at most one activation of `ACTIVATIONS`."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"the batched inner loop computes an nn.Sequential, got {type(module).__name__}")
    layers: List[Affine] = []
    for name, child in module.named_children():
        activation = ACTIVATIONS.get(type(child))
        if isinstance(child, nn.Linear) and child.bias is not None:
            layers.append(Affine(f"{name}.weight", f"{name}.bias"))
        elif activation is not None and layers and layers[-1].activation is None:
            layers[-1] = dataclasses.replace(layers[-1], activation=activation)
        else:
            raise ValueError(f"the batched inner loop has no rule for layer {name} ({child}); it "
                             f"computes nn.Linear layers with bias, each followed by at most one "
                             f"of {', '.join(t.__name__ for t in ACTIVATIONS)}")
    if not layers:
        raise ValueError(f"{module} has no nn.Linear layer")
    names = tuple(n for layer in layers for n in (layer.weight, layer.bias))
    shapes = tuple(tuple(module.get_parameter(n).shape) for n in names)
    return BatchedMLP(tuple(layers), names, shapes)


def check(view: BatchedMLP, module: nn.Module, atol: float = 1e-10) -> None:
    """Raise ValueError unless `view` computes `module` as flatten_module's apply(θ, x) does:
    the same parameters in the same order, and, on random parameters and inputs of two stacked
    networks (float64, CPU), the same logits and gradients (`backward`, plain and fused)."""
    expected = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    if tuple(zip(view.names, view.shapes)) != expected:
        raise ValueError(f"the batched view's parameters {list(zip(view.names, view.shapes))} are "
                         f"not the module's, in flatten_module's order: {list(expected)}")
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    params = {n: torch.randn(2, *s, generator=gen, dtype=f64) for n, s in zip(view.names, view.shapes)}
    x = torch.randn(2, 3, view.shapes[0][1], generator=gen, dtype=f64)
    outs = view.activations(params, x)
    cotangent = torch.randn(outs[-1].shape, generator=gen, dtype=f64)
    thetas, grads = view.flat(params), view.flat(view.backward(params, outs, cotangent))
    stepped = {n: p.clone() for n, p in params.items()}
    view.backward(stepped, view.activations(stepped, x), cotangent, lr=1.0, weight_decay=0.5)
    fused = 0.5 * thetas - view.flat(stepped)  # θ' = (1 − λ)θ − g at η = 1, λ = 1/2
    _, apply = flatten_module(copy.deepcopy(module).to("cpu", f64))
    for i in range(2):
        logits, pullback = vjp(lambda t, xi=x[i]: apply(t, xi), thetas[i])
        (g,) = pullback(cotangent[i])
        for what, ours, theirs in (("logits", outs[-1][i], logits), ("gradient", grads[i], g),
                                   ("fused SGD gradient", fused[i], g)):
            if not torch.allclose(ours, theirs, rtol=1e-9, atol=atol):
                raise ValueError(f"the batched view's {what} differ from the module's through "
                                 f"functional_call by {float((ours - theirs).abs().max()):.3g} "
                                 f"for {module}")


def checked_view(module: nn.Module) -> BatchedMLP:
    """`batched_view(module)`, checked against the module (`check`)."""
    view = batched_view(module)
    check(view, module)
    return view


_VIEWS: Dict[Shapes, BatchedMLP] = {}


def view_of(params: Params) -> BatchedMLP:
    """The checked batched view of the base network `mlp` whose stacked parameters `params` are
    (names and shapes in `named_parameters` order); built and checked once per architecture."""
    key = tuple((name, tuple(p.shape[1:])) for name, p in params.items())
    view = _VIEWS.get(key)
    if view is None:
        weights = [shape for _, shape in key if len(shape) == 2]
        if not weights:
            raise ValueError(f"no weight matrix among the stacked parameters {list(key)}")
        module = mlp(weights[0][1], [s[0] for s in weights[:-1]], weights[-1][0])
        view = checked_view(module)
        if tuple(zip(view.names, view.shapes)) != key:
            raise ValueError(f"the stacked parameters {list(key)} are not those of the base "
                             f"network {module}, in its order: {list(zip(view.names, view.shapes))}")
        _VIEWS[key] = view
    return view
