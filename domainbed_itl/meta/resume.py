"""What meta-training and CMA-ES share about a run folder's checkpoint: a trainer for a config
and initial loss, the saved config read in either layout, and the checks a resume makes.
See docs/meta_learning.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..files.runfolder import RunDirError, RunFolder
from ..losses.lossfile import LossSpec
from .config import MetaConfig
from .data import DomainData, data_fingerprint
from .inner import mlp
from .settings import SettingsError
from .trainer import MetaTrainer


def new_trainer(data: DomainData, config: MetaConfig, init: Optional[LossSpec],
                device: torch.device | str) -> MetaTrainer:
    """A MetaTrainer on `data` starting from the loss `init` (default: the family's own start);
    SettingsError (a ValueError) when `init` is not of the config's family and order."""
    if init is not None and (init.family, init.order) != (config.family, config.order):
        raise SettingsError("family", f"the initial loss is a {init.family} loss of order "
                            f"{init.order}, but the "
                         f"config searches {config.family} (order {config.order})")
    return MetaTrainer(data.domains, data.num_classes, config,
                       None if init is None else init.parameters, device=device,
                       heldout_labels=data.heldout_labels)


def saved_config(ckpt: Dict[str, Any], key: str = "config") -> Dict[str, Any]:
    """A checkpoint's MetaConfig, in either saved layout (flat, or nested by part), as a flat
    dict checked by MetaConfig; settings added after it was written take their default values,
    which were the behaviour then. RunDirError for settings that are unknown or whose values
    MetaConfig refuses."""
    try:
        return MetaConfig.from_dict(ckpt[key]).flat()
    except ValueError as error:
        raise RunDirError(f"the checkpoint's {key} cannot be used: {error}") from None


def initial_loss(ckpt: Dict[str, Any], key: str = "config") -> LossSpec:
    """The loss a checkpointed run started from: its config's family and order, its initial ω."""
    config = saved_config(ckpt, key)
    try:
        return LossSpec(config["family"], config["order"], list(ckpt["init_omega"]))
    except ValueError as error:
        raise RunDirError(f"the checkpoint's initial loss cannot be used: {error}") from None


def check_trainer_state(path: Path, state: Mapping[str, Any], trainer: MetaTrainer,
                        data: DomainData) -> None:
    """RunDirError naming the checkpoint at `path` unless its trainer `state` fits `trainer`:
    ω's shape, the outer optimiser's settings and buffers, the warm-started networks' shapes."""
    omega = tuple(trainer.omega.shape)
    fresh = trainer.optimizer.state_dict()["param_groups"]
    problems = [] if tuple(state["omega"].shape) == omega else [
        f"trainer.omega has shape {tuple(state['omega'].shape)}, expected {omega}"]
    saved = state["optimizer"]
    groups = saved["param_groups"]
    if len(groups) != 1 or any(groups[0][k] != v for k, v in fresh[0].items() if k in groups[0]):
        problems.append(f"the outer optimiser's settings {groups} are not the configuration's {fresh}")
    problems += [f"the outer optimiser's {name} of parameter {index} does not fit ω {omega}"
                 for index, buffers in saved["state"].items() for name, value in buffers.items()
                 if index != 0 or isinstance(value, torch.Tensor) and value.dim() and
                 tuple(value.shape) != omega]
    if state.get("inner") is not None:
        n = trainer.num_domains
        shapes = {name: (n, *p.shape) for name, p in
                  mlp(data.domains[0][0].shape[1], trainer.config.hidden,
                      data.num_classes).named_parameters()}
        inner = state["inner"]
        buffers = [v for v in inner["optimizer"].values() if isinstance(v, dict)]
        if any({k: tuple(v.shape) for k, v in b.items()} != shapes for b in [inner["params"], *buffers]):
            problems.append(f"the warm-started networks do not have the configuration's shapes {shapes}")
    if problems:
        raise RunDirError(f"cannot resume {path}: " + "; ".join(problems))


def check_resumable(folder: RunFolder, config_key: str, config: MetaConfig, data: DomainData,
                    init_omega: List[float], ignore: tuple = ()) -> None:
    """Refuse to resume `folder`'s checkpoint with another MetaConfig (but `ignore`), other data
    or another initial loss."""
    ckpt = folder.checkpoint
    folder.refuse_changes(saved_config(ckpt, config_key), config.flat(), ignore)
    folder.refuse_other("the data", ckpt["data"], data_fingerprint(data))
    folder.refuse_other("the initial loss parameters", ckpt["init_omega"], init_omega,
                        "; start from the same initial loss as the interrupted run")
