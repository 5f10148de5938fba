"""The meta protocol of `scripts/evaluate_loss`: losses compared through the inner loop, every
loss meeting the same networks and data on each seed, kept unit by unit in a run folder.
See docs/meta_learning.md#how-the-meta-learner-is-built and docs/loss_search.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..analysis.evaluation_report import REPORT_JSON, REPORT_MD
from ..files.runfolder import CHECKPOINT, RunDirError, RunFolder, RunKind
from ..files.schemas import EvaluationCheckpoint
from . import inner
from .config import InnerSettings, MetaConfig
from .data import DomainData, data_fingerprint
from .draws import StepDraws, domain_indices, draw_step, evaluation_generator
from .settings import Composed, SettingsError, part, same_setting

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, init=False)
class Protocol(Composed):
    """The inner training every loss gets (meta-training's `InnerSettings`), and the step counts
    after which the networks are evaluated: several lengths, or with an annealed learning rate
    or a stopping rule several caps. Built from flat names, as MetaConfig."""

    inner_steps: Tuple[int, ...] = (1000,)
    training: InnerSettings = part(InnerSettings)
    eval_size: Optional[int] = same_setting(MetaConfig, "eval_size")
    batched: bool = same_setting(MetaConfig, "batched")

    def __init__(self, inner_steps: Sequence[int] = (1000,), **values: Any):
        steps = tuple(sorted(set(inner_steps)))
        if not steps or min(steps) < 1:
            raise SettingsError("inner_steps", f"inner_steps must be positive step counts, got "
                                               f"{steps!r}")
        super().__init__(**values, inner_steps=max(steps))
        object.__setattr__(self, "inner_steps", steps)

    @property
    def inner(self) -> InnerSettings:
        """The inner-training settings, trained to the longest of `inner_steps`."""
        return self.training

    def flat(self) -> Dict[str, Any]:
        """Every setting by its flat name, `inner_steps` the lengths."""
        return {"inner_steps": self.inner_steps,
                **{k: v for k, v in super().flat().items() if k != "inner_steps"}}

    def to_dict(self) -> Dict[str, Any]:
        """The protocol as a plain dict (for the report and the checkpoint's settings)."""
        return self.flat()


EVALUATION_RUN = RunKind("loss evaluation", "domainbed-itl-evaluation-checkpoint", "units",
                         (CHECKPOINT, REPORT_MD, REPORT_JSON), EvaluationCheckpoint)


@dataclass
class _Setup:
    """What every unit of an evaluation shares: the data on the device, the base network, the
    inner optimiser."""

    data: DomainData
    protocol: Protocol
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    y_heldout: torch.Tensor
    model: torch.nn.Module
    optimizer: inner.InnerOptimizer


def _setup(data: DomainData, protocol: Protocol, device: str | torch.device) -> _Setup:
    device = torch.device(device)
    x = torch.cat([d[0] for d in data.domains]).to(device, torch.float32)
    y = torch.cat([d[1] for d in data.domains]).to(device)
    y_heldout = torch.cat(data.heldout_targets()).to(device)
    model = inner.mlp(x.shape[1], protocol.hidden, data.num_classes)
    return _Setup(data, protocol, device, x, y, y_heldout, model, protocol.inner.optimizer())


def _draws(data: DomainData, seed: int, protocol: Protocol) -> StepDraws:
    """Initial-weight seeds, minibatches and source evaluation subsets of one seed (CPU)."""
    domains, sources = domain_indices([len(y) for _, y in data.domains])
    return draw_step(evaluation_generator(seed), domains, sources, max(protocol.inner_steps),
                     protocol.batch_size, eval_size=protocol.eval_size)


def _trainings(setup: _Setup, params: inner.Params, loss: LossFn, batches: torch.Tensor,
               check: Sequence[torch.Tensor]) -> Iterator[Tuple[int, inner.InnerRun]]:
    """(length, what training did) for every length of the protocol, `params` holding the
    networks trained to it: one training read off at each length when the settings allow it
    (`InnerSettings.plain`), else a training from the initial `params` per length."""
    protocol, optimizer, x, y = setup.protocol, setup.optimizer, setup.x, setup.y
    settings = protocol.inner
    start = None if settings.plain else {k: p.clone() for k, p in params.items()}
    state, done, history = optimizer.init_state(params), 0, []
    for steps in protocol.inner_steps:
        if settings.plain:
            history.append(inner.train(params, loss, optimizer, state, x, y, batches[:, done:steps],
                                       protocol.batched, weight_decay=settings.inner_weight_decay))
            done = steps
            losses = torch.cat(history, dim=1)
            yield steps, inner.InnerRun(losses, [steps] * len(losses))
            continue
        for k, p in params.items():
            p.copy_(start[k])
        capped = settings.replace(inner_steps=steps)
        yield steps, inner.fit(params, loss, optimizer, optimizer.init_state(params), x, y,
                               batches[:, :steps], check, protocol.batched,
                               capped.learning_rates(), capped.inner_weight_decay,
                               capped.stop_rule())


def _accuracy_and_ce(params: inner.Params, i: int, x: torch.Tensor,
                     y: torch.Tensor) -> Tuple[float, float]:
    logits = inner.predict({k: p[i:i + 1] for k, p in params.items()}, x)[0]
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _records(setup: _Setup, draws: StepDraws, params: inner.Params, name: str, seed: int,
             steps: int, run: inner.InnerRun) -> List[Dict[str, Any]]:
    """The records of one loss and seed after `steps` inner steps (or at that cap), one per
    held-out domain."""
    records, tail = [], inner.tail_loss(run.losses, run.steps_used)
    for i, env in enumerate(setup.data.environments):
        idx, src = draws.heldout[i].to(setup.device), draws.source_eval[i].to(setup.device)
        acc, ce = _accuracy_and_ce(params, i, setup.x[idx], setup.y_heldout[idx])
        source_acc, _ = _accuracy_and_ce(params, i, setup.x[src], setup.y[src])
        record = {
            "loss": name, "unit": seed, "domain": env, "domain_index": i, "inner_steps": steps,
            "inner_steps_used": run.steps_used[i], "heldout_acc": acc, "heldout_ce": ce,
            "source_acc": source_acc, "gap": source_acc - acc, "final_train_loss": float(tail[i])}
        if run.start_norm is not None:
            record["stationarity"] = float(run.final_norm[i] / run.start_norm[i])
        records.append(record)
    return records


def _evaluate_unit(setup: _Setup, seed: int, name: str, loss: LossFn) -> List[Dict[str, Any]]:
    """One unit: the networks of `seed` trained with `loss`, read off at (or capped at) every
    length."""
    draws = _draws(setup.data, seed, setup.protocol)
    check = [s.to(setup.device) for s in draws.source_eval]
    params = inner.init_params(setup.model, draws.init_seeds, setup.device)
    return [record for steps, run in _trainings(setup, params, loss, draws.batches.to(setup.device),
                                                check)
            for record in _records(setup, draws, params, name, seed, steps, run)]


def evaluate_losses(data: DomainData, losses: Mapping[str, LossFn], seeds: Sequence[int],
                    protocol: Protocol, device: str | torch.device = "cpu",
                    progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Train and evaluate every loss on every seed; one record per (loss, seed, domain, steps).

    losses: name -> loss(logits, target, reduction=...) called like F.cross_entropy. Records
    hold loss, unit (the seed), domain (its environment name), domain_index, inner_steps (the
    length, or the cap), inner_steps_used, heldout_acc, heldout_ce, source_acc, gap
    (source_acc − heldout_acc) and final_train_loss; with a stopping rule also stationarity,
    the gradient norm on the source-evaluation subset at the end over the one at the start.
    """
    if not losses or not seeds:
        raise ValueError("evaluate_losses needs at least one loss and one seed")
    setup = _setup(data, protocol, device)
    records = []
    for seed in seeds:
        for name, loss in losses.items():
            records += _evaluate_unit(setup, seed, name, loss)
            if progress is not None:
                progress(f"seed {seed}, loss {name}: done")
    return records


def _finished_units(folder: RunFolder, settings: Mapping[str, Any],
                    definitions: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The units a resumed evaluation kept, refused if computed with other settings or losses."""
    if folder.checkpoint is None:
        return []
    saved = folder.checkpoint["settings"]
    folder.refuse_changes({k: v for k, v in saved.items() if k != "data"},
                          {k: v for k, v in settings.items() if k != "data"})
    folder.refuse_other("the data", saved["data"], settings["data"])
    units = list(folder.checkpoint["units"])
    for unit in units:
        now = definitions.get(unit["loss"], unit["definition"])
        if now != unit["definition"]:
            raise RunDirError(f"cannot continue the evaluation in {folder.path}: its finished units "
                              f"of loss {unit['loss']!r} were computed with {unit['definition']}, "
                              f"that loss is now {now}; overwrite the evaluation to start it again")
    return units


def evaluate_in_folder(folder: RunFolder, data: DomainData, losses: Mapping[str, Tuple[LossFn, Any]],
                       seeds: Sequence[int], protocol: Protocol, device: str | torch.device = "cpu",
                       provenance: Optional[Mapping[str, Any]] = None,
                       progress: bool = True) -> List[Dict[str, Any]]:
    """`evaluate_losses` in a run folder opened for EVALUATION_RUN, keeping every finished unit
    (a loss on a seed) in its checkpoint as it finishes; a resumed evaluation computes only the
    units it lacks. losses: name -> (loss, its definition, compared on a resume)."""
    if not losses or not seeds:
        raise ValueError("an evaluation needs at least one loss and one seed")
    settings = {**protocol.to_dict(), "data": data_fingerprint(data)}
    units = _finished_units(folder, settings, {k: d for k, (_, d) in losses.items()})
    folder.begin(None, device, provenance or {})
    have = {(u["unit"], u["loss"]): u for u in units}
    setup = _setup(data, protocol, device)
    wanted = [(seed, name) for seed in seeds for name in losses]
    bar = tqdm(total=len(wanted), initial=sum(key in have for key in wanted), desc="evaluate",
               unit="unit", disable=not progress)
    try:
        for seed, name in (key for key in wanted if key not in have):
            loss, definition = losses[name]
            have[seed, name] = {"unit": seed, "loss": name, "definition": definition,
                                "records": _evaluate_unit(setup, seed, name, loss)}
            units.append(have[seed, name])
            folder.save_checkpoint({"settings": settings, "units": units}, len(units))
            bar.update(1)
    finally:
        bar.close()
    return [r for key in wanted for r in have[key]["records"]]
