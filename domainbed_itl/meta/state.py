"""What a meta-training run carries from one outer step to the next: ω, the outer optimiser,
the steps done and, with warm starts, the inner networks with their optimiser state; saved
and restored whole, and rolled back cheaply when an update is undone.
See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .inner import Params

OUTER_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def clone_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> Dict[str, Any]:
    """A copy of an inner optimiser's state (dicts of tensors copied, on `device`)."""
    return {k: ({n: t.detach().to(device, copy=True) for n, t in v.items()} if isinstance(v, dict)
                else v) for k, v in state.items()}


class OuterState:
    """ω (a float32 tensor on `device`), its optimiser `optimizer` (Algorithm 1, line 16) with
    learning rate `lr`, the steps done and the warm-started inner networks (None: none)."""

    def __init__(self, omega: Sequence[float] | Tensor, optimizer: str, lr: float,
                 device: torch.device):
        self.device = device
        self.omega = torch.as_tensor(omega, dtype=torch.float32).detach().clone().to(device)
        if not torch.isfinite(self.omega).all():
            raise ValueError(f"initial loss parameters must be finite as 32-bit floats (below "
                             f"3.4e38 in size), got {[float(v) for v in omega]}")
        self.optimizer = OUTER_OPTIMIZERS[optimizer]([self.omega], lr=lr)
        self.steps_done = 0
        self.warm: Optional[Tuple[Params, Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, Any]:
        """Steps done, ω, optimiser state and, with warm starts, the inner networks and their
        optimiser state, all copied to the CPU."""
        state = {"steps_done": self.steps_done, "omega": self.omega.detach().cpu().clone(),
                 "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        if self.warm is not None:
            params, inner_state = self.warm
            state["inner"] = {"params": {k: v.detach().cpu().clone() for k, v in params.items()},
                              "optimizer": clone_state(inner_state, torch.device("cpu"))}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore everything `state_dict()` saved."""
        with torch.no_grad():
            self.omega.copy_(state["omega"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.warm = None
        if "inner" in state:
            params = {k: v.to(self.device, copy=True) for k, v in state["inner"]["params"].items()}
            self.warm = (params, clone_state(state["inner"]["optimizer"], self.device))

    def warm_copy(self) -> Optional[Tuple[Params, Dict[str, Any]]]:
        """Copies of the warm-started networks and their optimiser state (None: none)."""
        if self.warm is None:
            return None
        return {k: v.clone() for k, v in self.warm[0].items()}, clone_state(self.warm[1])

    def snapshot(self) -> Tuple[Tensor, Dict[str, Any]]:
        """ω and the outer optimiser's state: what an update changes (the inner networks are
        not touched by one, so not copied)."""
        return self.omega.detach().clone(), copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snapshot: Tuple[Tensor, Dict[str, Any]]) -> None:
        """Undo an update: ω and the optimiser as `snapshot()` found them."""
        with torch.no_grad():
            self.omega.copy_(snapshot[0])
        self.optimizer.load_state_dict(snapshot[1])

    def update(self, h: Tensor) -> None:
        """One step of the outer optimiser along the (aggregated) hypergradient h."""
        self.omega.grad = h
        self.optimizer.step()
        self.omega.grad = None
