"""How long a DomainBed sweep will take on this machine, from a few timed training steps.

See docs/paper_experiments.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ..files.job_progress import duration_text
from .domainbed_env import import_domainbed
from .trained_models import rebuild_splits

EVAL_BATCH = 64  # DomainBed's train evaluates in batches of 64


@dataclass(frozen=True)
class JobTiming:
    """Seconds measured on this machine for one DomainBed job, and the job's length."""

    algorithm: str
    dataset: str
    setup_s: float  # loading the data, building the algorithm
    step_s: float  # one `update`, minibatches included
    evaluation_s: float  # `misc.accuracy` on every split once
    steps: int
    checkpoint_freq: int

    @property
    def evaluations(self) -> int:
        """How many times the job evaluates: at step 0, every checkpoint_freq, and the last step."""
        return n_evaluations(self.steps, self.checkpoint_freq)

    @property
    def job_s(self) -> float:
        """Estimated seconds of the whole job."""
        return self.setup_s + self.steps * self.step_s + self.evaluations * self.evaluation_s


def n_evaluations(steps: int, checkpoint_freq: int) -> int:
    """Checkpoints of DomainBed's train over `steps` steps: every step % checkpoint_freq == 0,
    and the last step."""
    return math.ceil(steps / checkpoint_freq) + (1 if (steps - 1) % checkpoint_freq else 0)


def _job_hparams(train_args: Mapping[str, Any], registry, misc) -> dict:
    """The job's hparams as DomainBed's train makes them: defaults for hparams seed 0, else its
    random draw, then the --hparams overrides."""
    algorithm, dataset, seed = train_args["algorithm"], train_args["dataset"], train_args["hparams_seed"]
    if seed == 0:
        hparams = registry.default_hparams(algorithm, dataset)
    else:
        hparams = registry.random_hparams(algorithm, dataset,
                                          misc.seed_hash(seed, train_args["trial_seed"]))
    hparams.update(json.loads(train_args.get("hparams") or "{}"))
    return hparams


def time_job(train_args: Mapping[str, Any], domainbed_root: Optional[str | os.PathLike] = None,
             n_steps: int = 3, eval_examples: int = 640) -> JobTiming:
    """Time the DomainBed job with train.py arguments `train_args` (as DomainBed's sweep makes
    them) on the CPU: one untimed warm-up step, then `n_steps` timed ones; the evaluation from
    `eval_examples` examples, after an untimed batch. Global random states are left as they were."""
    import domainbed_itl

    datasets = import_domainbed(domainbed_root, "domainbed.datasets")
    algorithms = import_domainbed(domainbed_root, "domainbed.algorithms")
    registry = import_domainbed(domainbed_root, "domainbed.hparams_registry")
    misc = import_domainbed(domainbed_root, "domainbed.lib.misc")
    loaders = import_domainbed(domainbed_root, "domainbed.lib.fast_data_loader")
    domainbed_itl.register(domainbed_root)
    args = {"holdout_fraction": 0.2, "seed": 0, "trial_seed": 0, "hparams_seed": 0, **train_args}
    dataset_class = datasets.get_dataset_class(args["dataset"])
    hparams = _job_hparams(args, registry, misc)
    with torch.random.fork_rng(devices=[]):
        start = time.perf_counter()
        splits = rebuild_splits(args, hparams, domainbed_root=domainbed_root)
        draws = [iter(loaders.InfiniteDataLoader(
            splits.in_splits[i], misc.make_weights_for_balanced_classes(splits.in_splits[i])
            if hparams.get("class_balanced") else None, hparams["batch_size"], 0))
            for i in splits.sources]
        algorithm = algorithms.get_algorithm_class(args["algorithm"])(
            splits.input_shape, splits.num_classes, len(splits.sources), hparams)
        algorithm.update([next(d) for d in draws], None)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_steps):
            algorithm.update([next(d) for d in draws], None)
        step_s = (time.perf_counter() - start) / n_steps
        part = Subset(splits.in_splits[0], range(min(eval_examples, len(splits.in_splits[0]))))
        warm_up = Subset(part, range(min(EVAL_BATCH, len(part))))
        misc.accuracy(algorithm, DataLoader(warm_up, batch_size=EVAL_BATCH), None, "cpu")
        start = time.perf_counter()
        misc.accuracy(algorithm, DataLoader(part, batch_size=EVAL_BATCH), None, "cpu")
        total = sum(len(s) for s in (*splits.in_splits, *splits.out_splits))
        evaluation_s = (time.perf_counter() - start) * total / len(part)
    return JobTiming(args["algorithm"], args["dataset"], setup_s, step_s, evaluation_s,
                     int(args.get("steps") or dataset_class.N_STEPS),
                     int(args.get("checkpoint_freq") or dataset_class.CHECKPOINT_FREQ))



def describe_estimate(timing: JobTiming, n_jobs: int, shrink: Sequence[str]) -> str:
    """What the sweep of `n_jobs` jobs like the timed one costs, one after the other, and the
    flags that make it smaller."""
    return (f"estimate (no GPU; timed here on the first job, {timing.algorithm} on "
            f"{timing.dataset}): {timing.step_s:.2f} s a training step, "
            f"{duration_text(timing.evaluation_s)} an evaluation of every split, "
            f"{duration_text(timing.setup_s)} to load the data; a job of {timing.steps} steps and "
            f"{timing.evaluations} evaluations takes about {duration_text(timing.job_s)}, the "
            f"{n_jobs} job{'s' * (n_jobs != 1)} about {duration_text(n_jobs * timing.job_s)} one after "
            f"the other.\nTo shrink the sweep: {', '.join(shrink)}.")


def describe_estimates(timings: Sequence[JobTiming], counts: Sequence[int],
                       shrink: Sequence[str]) -> str:
    """What a sweep of `counts[i]` jobs like `timings[i]` (the first job of each algorithm and
    dataset, in launch order) costs, one job after the other, and the flags that make it smaller."""
    if len(timings) == 1:
        return describe_estimate(timings[0], counts[0], shrink)
    each = "; ".join(
        f"{t.algorithm} on {t.dataset}: {t.step_s:.2f} s a training step, "
        f"{duration_text(t.evaluation_s)} an evaluation, {duration_text(t.setup_s)} to load the data, "
        f"about {duration_text(t.job_s)} a job of {t.steps} steps ({n} job{'s' * (n != 1)})"
        for t, n in zip(timings, counts))
    total = sum(t.job_s * n for t, n in zip(timings, counts))
    return (f"estimate (no GPU; timed here on the first job of each algorithm and dataset, in "
            f"launch order): {each}. The {sum(counts)} jobs take about {duration_text(total)} one "
            f"after the other.\nTo shrink the sweep: {', '.join(shrink)}.")


def time_kinds(jobs: Sequence[Mapping[str, Any]], domainbed_root: Optional[str | os.PathLike]
               ) -> Tuple[List[JobTiming], List[int]]:
    """Time the first job of each (algorithm, dataset) of `jobs` (train arguments, in launch
    order); the timings and how many jobs each stands for."""
    firsts: Dict[Tuple[str, str], Mapping[str, Any]] = {}
    counts: Dict[Tuple[str, str], int] = {}
    for job in jobs:
        kind = (job["algorithm"], job["dataset"])
        firsts.setdefault(kind, job)
        counts[kind] = counts.get(kind, 0) + 1
    return ([time_job(job, domainbed_root) for job in firsts.values()],
            [counts[kind] for kind in firsts])


def print_plan(n_jobs: int, detail: str, first_job: Optional[Mapping[str, Any]],
               domainbed_root: Optional[str | os.PathLike], shrink: Sequence[str],
               launcher: str = "local", jobs: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Print the sweep's plan (`n_jobs` jobs: `detail`) and, when its jobs run on this machine
    without a GPU one after the other (DomainBed's `local` launcher), the estimate of its
    duration from timing `first_job` (None: no estimate), or with `jobs` (every job's train
    arguments, in launch order) the first job of each algorithm and dataset. A failed timing is
    reported, not raised: the jobs report their own errors."""
    print(f"plan: {n_jobs} job{'s' * (n_jobs != 1)} to launch ({detail})", flush=True)
    if first_job is None or n_jobs == 0:
        return
    if torch.cuda.is_available() or launcher != "local":
        where = "on a GPU machine" if torch.cuda.is_available() else f"with launcher {launcher}"
        print(f"estimate: none {where}; the progress bar gives the time left once jobs finish",
              flush=True)
        return
    try:
        timings, counts = time_kinds(jobs or [first_job], domainbed_root)
    except Exception as error:  # a job would fail on the same data; its own error says more
        print(f"estimate: not available ({type(error).__name__}: {error})", flush=True)
        return
    if not jobs:
        counts = [n_jobs]
    print(describe_estimates(timings, counts, shrink), flush=True)
