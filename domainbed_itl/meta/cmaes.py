"""CMA-ES search for the loss parameters ω (the evolutionary baseline of the paper's Fig. 4),
scored by `MetaTrainer.heldout_objective` with the randomness of outer step g for generation g,
in a run folder laid out as meta_train's. See docs/cma_search.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import cma
import numpy as np
import torch

from .. import __version__
from ..files.errors import OVERWRITE, reworded, spelled, wording
from ..files.runfolder import (RunDirError, RunFolder, RunKind, log_stderr, source_commit,
                               using_run_folder)
from ..files.schemas import CMACheckpoint
from ..losses.lossfile import LossSpec
from .config import MetaConfig
from .data import DomainData, data_fingerprint
from .settings import Settings, setting
from .resume import check_resumable, new_trainer
from .trainer import MetaTrainer

# An objective: ω and the generation (1, 2, ...) -> a dict holding at least `FITNESS`.
Objective = Callable[[List[float], int], Dict[str, Any]]
FITNESS = "outer_heldout_loss"
# A candidate's objective raises this when its loss cannot be trained with (the trainer's
# NonFiniteError: the inner training diverged): the candidate is ranked last, the search goes on.
CandidateFailure = FloatingPointError


@dataclass(frozen=True)
class CMAConfig(Settings):
    """The search's settings. popsize None is pycma's default λ = 4 + ⌊3 ln n⌋ for n parameters."""

    generations: int = setting(20, "CMA-ES generations", kind="int", low=1)
    popsize: Optional[int] = setting(None, "candidates per generation", kind="int", low=2,
                                     optional=True,
                                     expected="an integer >= 2 (or None for pycma's default)")
    sigma0: float = setting(1.0, "initial step size", kind="float", low=0, low_open=True,
                            expected="a positive finite number")
    seed: int = setting(0, "seed of CMA-ES's samples", kind="int", low=0)


def default_popsize(dimension: int) -> int:
    """pycma's default population size for `dimension` parameters: 4 + ⌊3 ln n⌋."""
    return 4 + int(3 * math.log(dimension))


class CMASearch:
    """CMA-ES on ω from `x0`: `generation(objective)` samples, scores and updates once.

    The incumbent (`best`) is the candidate with the lowest fitness seen so far, with its
    objective record; `mean` is the strategy's current mean (pycma's `xfavorite`).
    """

    def __init__(self, x0: Sequence[float], config: CMAConfig):
        self.config = config
        self.dimension = len(x0)
        if self.dimension < 2:
            raise ValueError(f"CMA-ES needs at least 2 parameters, got {self.dimension}")
        self.x0 = [float(v) for v in x0]
        self.es = self._strategy()
        self.generations_done = 0
        self.best: Optional[Dict[str, Any]] = None  # {"omega", "generation", "result"}
        self.history: List[Dict[str, List]] = []  # per generation: candidates, fitnesses told

    def _strategy(self) -> cma.CMAEvolutionStrategy:
        """A new strategy from x0 with the settings' step size, population and seed."""
        rng = np.random.RandomState(self.config.seed)
        options = {"randn": rng.randn, "seed": np.nan, "verbose": -9}
        if self.config.popsize is not None:
            options["popsize"] = self.config.popsize
        return cma.CMAEvolutionStrategy(list(self.x0), self.config.sigma0, options)

    @property
    def popsize(self) -> int:
        """λ, the candidates per generation."""
        return int(self.es.popsize)

    @property
    def mean(self) -> List[float]:
        """The current mean of the search distribution."""
        return [float(v) for v in self.es.mean]

    def generation(self, objective: Objective) -> Dict[str, Any]:
        """Sample λ candidates, score each with `objective(ω, g)`, update the distribution.

        Returns the generation's record: the best candidate's objective record (its keys at the
        top level), its ω, every candidate's fitness (None where its objective failed), the
        incumbent and the strategy's mean and step size after the update.
        """
        g = self.generations_done + 1
        t0 = time.perf_counter()
        candidates = self.es.ask()
        results: List[Optional[Dict[str, Any]]] = []
        failures: List[Optional[str]] = []
        for x in candidates:
            try:
                result = objective([float(v) for v in x], g)
                fitness = float(result[FITNESS])
                if not math.isfinite(fitness):
                    raise FloatingPointError(f"non-finite {FITNESS} {fitness}")
                results.append(result)
                failures.append(None)
            except CandidateFailure as error:
                results.append(None)
                failures.append(str(error))
        scored = [float(r[FITNESS]) for r in results if r is not None]
        if not scored:
            raise FloatingPointError(f"generation {g}: every candidate failed, e.g. {failures[0]}")
        # Failed candidates rank below every scored one (CMA-ES uses only the ranking).
        worst = max(scored) + 1.0 + abs(max(scored))
        fitnesses = [worst if r is None else float(r[FITNESS]) for r in results]
        self.es.tell(candidates, fitnesses)
        self.history.append({"candidates": [[float(v) for v in x] for x in candidates],
                             "fitnesses": fitnesses})
        self.generations_done = g
        best_index = min((i for i, r in enumerate(results) if r is not None), key=fitnesses.__getitem__)
        best_omega = [float(v) for v in candidates[best_index]]
        if self.best is None or fitnesses[best_index] < self.best["result"][FITNESS]:
            self.best = {"omega": best_omega, "generation": g, "result": results[best_index]}
        elapsed = time.perf_counter() - t0
        return {**results[best_index], "step": g, "omega": self.best["omega"],
                "candidate_omega": best_omega,
                "population": {FITNESS: [None if r is None else float(r[FITNESS]) for r in results],
                               "outer_heldout_acc": [None if r is None else r.get("outer_heldout_acc")
                                                     for r in results],
                               "failed": [f for f in failures if f is not None]},
                "best_generation": self.best["generation"],
                "best_outer_heldout_loss": float(self.best["result"][FITNESS]),
                "cma_mean": self.mean, "cma_sigma": float(self.es.sigma),
                "popsize": self.popsize, "time_step_s": elapsed}

    def state_dict(self) -> Dict[str, Any]:
        """What `load_state_dict` needs to continue exactly: numbers only (no pickle)."""
        return {"generations_done": self.generations_done, "best": self.best,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from `state_dict()` by replaying its generations into a new strategy.
        ValueError when the state holds no replayable search of these settings (a state of
        another dimension or population, a pickled strategy of an earlier version, which is
        never unpickled, or candidates this pycma no longer draws)."""
        history = state.get("history")
        if history is None:
            text = ("it holds the CMA-ES strategy as a pickle (an earlier version of domainbed-itl "
                    "wrote it so); a pickle can run code when read, so it is not read: "
                    f"{OVERWRITE} starts the search again")
            raise reworded(ValueError(spelled(text)), text)
        es = self._strategy()
        for g, told in enumerate(history, start=1):
            candidates = es.ask()
            asked = np.asarray(candidates, dtype=float)
            saved = np.asarray(told["candidates"], dtype=float)
            if asked.shape != saved.shape or not np.allclose(asked, saved, rtol=1e-12, atol=0):
                size = "" if self.config.popsize is None else f" and population {self.config.popsize}"
                raise ValueError(f"the state holds no CMA-ES of dimension {self.dimension}{size} "
                                 f"with these settings: its generation {g} is not what they draw "
                                 f"(candidates of shape {saved.shape}, expected {asked.shape}); "
                                 "was it written with other settings or another pycma version?")
            es.tell(candidates, [float(f) for f in told["fitnesses"]])
        if len(history) != int(state["generations_done"]):
            raise ValueError(f"it holds {len(history)} generations but says "
                             f"{state['generations_done']} are done")
        self.es, self.history = es, [dict(h) for h in history]
        self.generations_done = int(state["generations_done"])
        self.best = state["best"]


CMA_RUN = RunKind("CMA-ES search", "domainbed-itl-cmaes-checkpoint", "generations",
                  schema=CMACheckpoint)


def run_cma_search(data: DomainData, config: CMAConfig, meta_config: MetaConfig,
                   output_dir: Union[str, os.PathLike, RunFolder], *,
                   init: Optional[LossSpec] = None, resume: bool = False, overwrite: bool = False,
                   device: str | torch.device = "cpu",
                   provenance: Optional[Dict[str, Any]] = None,
                   on_generation: Optional[Callable[[Dict[str, Any]], None]] = None,
                   log: Callable[[str], None] = log_stderr) -> CMASearch:
    """CMA-ES over `meta_config`'s loss family, scored by `MetaTrainer.heldout_objective`, into
    `output_dir` (a folder, or a RunFolder opened for CMA_RUN): checkpoint.pt, metrics.jsonl
    (one record per generation) and loss.json (the incumbent), each replaced atomically after
    every generation. The folder follows the run-folder rules (domainbed_itl.files.runfolder):
    one writer at a time, --resume or --overwrite for a non-empty folder, and an --overwrite
    that keeps the previous run until this one has a checkpoint.
    """
    trainer = new_trainer(data, meta_config, init, device)
    search = CMASearch(trainer.omega.tolist(), config)
    provenance = provenance or {}
    with using_run_folder(output_dir, CMA_RUN, resume=resume, overwrite=overwrite,
                          command=provenance.get("command"), log=log) as folder:
        records: List[Dict[str, Any]] = []
        if folder.checkpoint is not None:
            ckpt = folder.checkpoint
            folder.refuse_changes(ckpt["cma_config"], config.to_dict(), ignore=("generations",))
            check_resumable(folder, "meta_config", meta_config, data, trainer.omega.tolist())
            try:
                search.load_state_dict(ckpt["search"])
            except ValueError as error:
                raise RunDirError(f"cannot resume {folder.checkpoint_path}: {wording(error)}",
                                  path=folder.checkpoint_path) from None
            records.extend(ckpt["metrics"])
        folder.begin(config.generations, device, provenance)
        _search(folder, search, trainer, data, records, on_generation)
    return search


def _search(folder: RunFolder, search: CMASearch, trainer: MetaTrainer, data: DomainData,
            records: List[Dict[str, Any]],
            on_generation: Optional[Callable[[Dict[str, Any]], None]]) -> None:
    """The generations of run_cma_search, writing the checkpoint and its views after each."""
    config, meta_config = search.config, trainer.config
    init_omega, fingerprint, commit = trainer.omega.tolist(), data_fingerprint(data), source_commit()

    def loss() -> Optional[LossSpec]:
        if search.best is None:
            return None
        return LossSpec(meta_config.family, meta_config.order, search.best["omega"], {
            "search": "cma-es", "meta_train_dataset": data.name,
            "generations": search.generations_done, "best_generation": search.best["generation"],
            "best_outer_heldout_loss": search.best["result"][FITNESS], "seed": config.seed,
            "package_version": __version__, "source_commit": commit, **folder.provenance,
            "cma_config": config.to_dict(), "meta_config": meta_config.to_dict(),
            "data": {**{k: v for k, v in fingerprint.items() if k != "sha256"}, **data.info},
            "init_omega": init_omega})

    if folder.checkpoint is not None:
        folder.write_views(records, loss())
    while search.generations_done < config.generations:
        record = search.generation(trainer.heldout_objective)
        record["inner_trainings"] = search.generations_done * search.popsize * trainer.num_domains
        records.append(record)
        folder.save_checkpoint({"cma_config": config.to_dict(), "meta_config": meta_config.to_dict(),
                                "data": fingerprint, "init_omega": init_omega,
                                "search": search.state_dict(), "metrics": records},
                               search.generations_done, records, loss())
        if on_generation is not None:
            on_generation(record)
