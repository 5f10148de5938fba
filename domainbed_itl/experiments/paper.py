"""The paper's experiments as sweep definitions: one TOML file per table or figure in `sweeps/`.

Each names its runner (or its stages), the flags of a `paper` and a `reduced` variant, and a cost
estimate per job with its basis; this module reads them, counts jobs and builds the commands.
See docs/paper_experiments.md (the format) and docs/staged_definitions.md (stages).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from ..datasets import DATASETS
from ..files.resources import Traversable, shipped
from ..meta.config import InnerSettings, MetaConfig
from ..meta.settings import leaf_names

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

VARIANTS = ("paper", "reduced")

# The flags given when the commands are built, never by a definition.
BUILD_TIME_FLAGS = frozenset({"data_dir", "output_dir", "command_launcher", "domainbed_root",
                              "skip_confirmation"})

# The flags a definition may set, per runner, as spelled on its command line (less the build-time
# ones); tests/experiments/test_paper_sweep.py checks each against its runner's parser.
# DomainBed's sweep (domainbed/scripts/sweep.py).
DOMAINBED_SWEEP_FLAGS = frozenset({
    "datasets", "algorithms", "task", "n_hparams_from", "n_hparams", "seed", "n_trials", "steps",
    "hparams", "holdout_fraction", "single_test_envs"})
# domainbed_itl.scripts.single_source_sweep: DomainBed's sweep flags, ours, and the submitit ones.
SINGLE_SOURCE_SWEEP_FLAGS = frozenset({
    "datasets", "algorithms", "n_hparams_from", "n_hparams", "n_trials", "steps", "hparams",
    "holdout_fraction", "seed", "sources", "checkpoint_freq", "submitit_folder", "submitit_cluster",
    "submitit_partition", "submitit_gpus_per_node", "submitit_cpus_per_task", "submitit_mem_gb",
    "submitit_timeout_min", "submitit_array_parallelism", "submitit_max_array_size",
    "submitit_wait", "submitit_name", "submitit_extra", "no_progress", "verbose"})
# domainbed_itl.scripts.meta_train: its own flags and every setting of the settings tree.
META_TRAIN_FLAGS = frozenset({
    "preset", "dataset", "per_domain_cap", "data_seed", "label_noise", "family", "order", "init",
    "device", "no_progress", "resume", "overwrite", *leaf_names(MetaConfig)})
# domainbed_itl.scripts.evaluate_loss meta: losses against cross-entropy with fresh MLPs, trained
# with every inner-training setting.
EVALUATE_LOSS_FLAGS = frozenset({
    "losses", "reference", "dataset", "seeds", "eval_size", "per_domain_cap", "data_seed",
    "label_noise", "device", "overwrite", "no_progress", *leaf_names(InnerSettings)})


class SweepDefinitionError(ValueError):
    """A sweep definition file, or a name or value asked of it, is not valid."""


@dataclass(frozen=True)
class Runner:
    """How an experiment runs: the module, its subcommand, and what collects its results."""

    module: str
    subcommand: Optional[str]
    collect_module: Optional[str]
    takes_launcher: bool
    takes_domainbed_root: bool
    flags: FrozenSet[str]  # the flags a definition may set


RUNNERS: Dict[str, Runner] = {
    "domainbed_sweep": Runner("domainbed.scripts.sweep", "launch",
                              "domainbed.scripts.collect_results", True, False,
                              DOMAINBED_SWEEP_FLAGS),
    "single_source_sweep": Runner("domainbed_itl.scripts.single_source_sweep", "launch",
                                  "domainbed_itl.scripts.collect_single_source", True, True,
                                  SINGLE_SOURCE_SWEEP_FLAGS),
    "meta_train": Runner("domainbed_itl.scripts.meta_train", None, None, False, True,
                         META_TRAIN_FLAGS),
    "evaluate_loss": Runner("domainbed_itl.scripts.evaluate_loss", "meta", None, False, True,
                            EVALUATE_LOSS_FLAGS),
}
# Runners that are one process (one job), not a sweep of DomainBed jobs.
ONE_JOB_RUNNERS = ("meta_train", "evaluate_loss")


@dataclass(frozen=True)
class Cost:
    """The estimated cost of one job, per dataset or one value for all, in `unit`."""

    unit: str
    per_job: Mapping[str, float]  # dataset name -> cost; key "default" for the others
    basis: str

    def of(self, dataset: Optional[str]) -> float:
        """The cost of one job on `dataset` (None: a job without a dataset)."""
        if dataset is not None and dataset in self.per_job:
            return self.per_job[dataset]
        if "default" in self.per_job:
            return self.per_job["default"]
        raise SweepDefinitionError(f"cost.per_job has no entry for {dataset!r} and no 'default'")


@dataclass(frozen=True)
class Variant:
    """One scale of an experiment: the runner's flags and the cost per job."""

    name: str
    args: Mapping[str, Any]
    cost: Cost


@dataclass(frozen=True)
class Stage:
    """One runner step of an experiment; `name` None for the only stage, which runs in
    output_dir itself, else the subfolder of output_dir it runs in."""

    name: Optional[str]
    runner_name: str
    variants: Mapping[str, Variant]

    @property
    def runner(self) -> Runner:
        """The runner of this stage."""
        return RUNNERS[self.runner_name]

    def variant(self, reduced: bool) -> Variant:
        """The `reduced` or the `paper` variant."""
        return self.variants["reduced" if reduced else "paper"]


@dataclass(frozen=True)
class Experiment:
    """One sweep definition file: its stages, run in order."""

    name: str
    title: str
    reproduces: str
    notes: str
    stages: Tuple[Stage, ...]
    path: Union[Traversable, str]

    @property
    def stage(self) -> Stage:
        """The only stage of a one-stage experiment."""
        if len(self.stages) != 1:
            raise SweepDefinitionError(f"{self.name} has {len(self.stages)} stages; ask for one of "
                                       f"{', '.join(str(s.name) for s in self.stages)}")
        return self.stages[0]

    @property
    def runner_name(self) -> str:
        """The runner of a one-stage experiment."""
        return self.stage.runner_name

    @property
    def runner(self) -> Runner:
        """The runner of a one-stage experiment."""
        return self.stage.runner

    def variant(self, reduced: bool) -> Variant:
        """The `reduced` or the `paper` variant of a one-stage experiment."""
        return self.stage.variant(reduced)


def _require(table: Mapping, key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise SweepDefinitionError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise SweepDefinitionError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _check_args(args: Mapping[str, Any], runner_name: str, where: str) -> None:
    forbidden = sorted(set(args) & BUILD_TIME_FLAGS)
    if forbidden:
        raise SweepDefinitionError(
            f"{where}: {', '.join(forbidden)} must not be in a definition; they are given to "
            "paper_sweep (--data_dir, --output_dir, --command_launcher, --domainbed_root)")
    allowed = RUNNERS[runner_name].flags
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise SweepDefinitionError(f"{where}: unknown flag(s) {', '.join(unknown)} for runner "
                                   f"{runner_name}; it takes {', '.join(sorted(allowed))}")
    for key, value in args.items():
        if isinstance(value, list) and not all(isinstance(v, (str, int, float)) for v in value):
            raise SweepDefinitionError(f"{where}: {key} must list strings or numbers, got {value!r}")
        if value is False:
            raise SweepDefinitionError(f"{where}: {key} = false; leave the flag out instead")
    if runner_name not in ONE_JOB_RUNNERS:
        for key in ("datasets", "algorithms"):
            values = _require(args, key, list, where)
            if not values or not all(isinstance(v, str) for v in values):
                raise SweepDefinitionError(f"{where}: {key} must be a non-empty list of names")
        for key in ("n_hparams", "n_trials"):
            if key in args and (not isinstance(args[key], int) or args[key] < 1):
                raise SweepDefinitionError(f"{where}: {key} must be an integer >= 1, got {args[key]!r}")
        if args.get("n_hparams_from", 0) >= args.get("n_hparams", 20):
            raise SweepDefinitionError(f"{where}: n_hparams_from must be below n_hparams")


def _parse_cost(table: Mapping, where: str) -> Cost:
    unit = _require(table, "unit", str, where)
    basis = _require(table, "basis", str, where)
    per_job = table.get("per_job")
    if isinstance(per_job, (int, float)) and not isinstance(per_job, bool):
        per_job = {"default": per_job}
    if not isinstance(per_job, dict) or not per_job or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in per_job.values()):
        raise SweepDefinitionError(f"{where}: per_job must be a number >= 0 or a table of them "
                                   f"keyed by dataset (and 'default'), got {per_job!r}")
    return Cost(unit, {k: float(v) for k, v in per_job.items()}, basis)


_STAGE_REFERENCE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _strings(value: Any) -> List[str]:
    """Every string inside a flag value (lists and tables included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _strings(v)]
    if isinstance(value, list):
        return [t for v in value for t in _strings(v)]
    return []


def _parse_stage(table: Mapping[str, Any], name: Optional[str], earlier: Sequence[str],
                 where: str) -> Stage:
    runner = _require(table, "runner", str, where)
    if runner not in RUNNERS:
        raise SweepDefinitionError(f"{where}: runner {runner!r} is not one of {', '.join(RUNNERS)}")
    variants = {}
    for variant in VARIANTS:
        part = _require(table, variant, dict, where)
        extra = sorted(set(part) - {"args", "cost"})
        if extra:
            raise SweepDefinitionError(f"{where} [{variant}]: unknown key(s) {', '.join(extra)}; "
                                       "expected args and cost")
        args = _require(part, "args", dict, f"{where} [{variant}]")
        _check_args(args, runner, f"{where} [{variant}.args]")
        for text in _strings(args):
            for ref in _STAGE_REFERENCE.findall(text):
                if ref not in earlier:
                    raise SweepDefinitionError(
                        f"{where} [{variant}.args]: {{{ref}}} in {text!r} names no earlier stage; "
                        f"expected one of: {', '.join(earlier) or '(none: this is the first stage)'}")
        cost = _parse_cost(_require(part, "cost", dict, f"{where} [{variant}]"),
                           f"{where} [{variant}.cost]")
        variants[variant] = Variant(variant, dict(args), cost)
    return Stage(name, runner, variants)


def parse_experiment(name: str, data: Mapping[str, Any], path: Union[Traversable, str] = "<memory>"
                     ) -> Experiment:
    """An experiment from the parsed TOML `data`; raises SweepDefinitionError on any problem."""
    where = str(path)
    common = {"title", "reproduces", "notes"}
    known = common | ({"stages"} if "stages" in data else {"runner", *VARIANTS})
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepDefinitionError(f"{where}: unknown key(s) {', '.join(unknown)}; expected "
                                   f"{', '.join(sorted(known))}")
    if "stages" not in data:
        stages = (_parse_stage(data, None, [], where),)
    else:
        tables = data["stages"]
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise SweepDefinitionError(f"{where}: stages must be a non-empty array of tables ([[stages]])")
        stages, names = [], []
        for number, table in enumerate(tables, start=1):
            at = f"{where} [stage {number}]"
            stage_name = _require(table, "name", str, at)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stage_name) or stage_name in names:
                raise SweepDefinitionError(f"{at}: name {stage_name!r} must be a new identifier "
                                           "(letters, digits, _): it names the stage's folder")
            extra = sorted(set(table) - {"name", "runner", *VARIANTS})
            if extra:
                raise SweepDefinitionError(f"{at}: unknown key(s) {', '.join(extra)}; expected name, "
                                           "runner, paper and reduced")
            stages.append(_parse_stage(table, stage_name, names, f"{at} ({stage_name})"))
            names.append(stage_name)
        for variant in VARIANTS:
            units = {s.variants[variant].cost.unit for s in stages}
            if len(units) > 1:
                raise SweepDefinitionError(f"{where}: the stages' {variant} costs use different units "
                                           f"({', '.join(sorted(units))}); use one")
        stages = tuple(stages)
    return Experiment(name, _require(data, "title", str, where),
                      _require(data, "reproduces", str, where), data.get("notes", ""), stages, path)


def _folder(sweeps_dir: Optional[Traversable]) -> Traversable:
    return shipped("sweeps") if sweeps_dir is None else sweeps_dir


def available(sweeps_dir: Optional[Traversable] = None) -> List[str]:
    """The names of the definitions in `sweeps_dir` (default: the shipped `sweeps/`), sorted."""
    folder = _folder(sweeps_dir)
    if not folder.is_dir():
        raise SweepDefinitionError(f"sweep definitions folder {folder} does not exist; pass "
                                   "--sweeps_dir a folder of *.toml definitions")
    return sorted(p.name[:-len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_experiment(name: str, sweeps_dir: Optional[Traversable] = None) -> Experiment:
    """The definition `name` (name.toml in `sweeps_dir`, default: the shipped `sweeps/`)."""
    names = available(sweeps_dir)
    if name not in names:
        raise SweepDefinitionError(f"no sweep definition {name!r} in {_folder(sweeps_dir)}; "
                                   f"expected one of: {', '.join(names)}")
    path = _folder(sweeps_dir).joinpath(f"{name}.toml")
    if tomllib is None:
        raise SweepDefinitionError("reading sweep definitions needs Python >= 3.11 (tomllib) or "
                                   "the tomli package: pip install tomli")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SweepDefinitionError(f"{path} is not valid TOML: {error}") from None
    return parse_experiment(name, data, path)


def num_environments(dataset: str) -> int:
    """The number of environments of a DomainBed dataset of the paper's experiments."""
    if dataset not in DATASETS:
        raise SweepDefinitionError(
            f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[dataset].environments


def n_test_env_settings(n_envs: int, single_test_envs: bool) -> int:
    """How many test-env settings DomainBed's sweep makes: all singles, plus all pairs by default."""
    if single_test_envs:
        return n_envs
    if n_envs < 3:
        raise SweepDefinitionError(f"DomainBed's default sweep needs >= 3 environments, got {n_envs}")
    return n_envs + n_envs * (n_envs - 1) // 2


def count_jobs(experiment: Experiment, reduced: bool) -> Dict[Optional[str], int]:
    """Jobs per dataset of the variant, summed over the stages (key None: one-process runs such as
    meta-training)."""
    jobs: Dict[Optional[str], int] = {}
    for stage in experiment.stages:
        for dataset, n in count_stage_jobs(stage, reduced).items():
            jobs[dataset] = jobs.get(dataset, 0) + n
    return jobs


def count_stage_jobs(stage: Stage, reduced: bool) -> Dict[Optional[str], int]:
    """Jobs per dataset of one stage's variant (key None: the one job of a `ONE_JOB_RUNNERS` run,
    meta-training or a loss evaluation).

    DomainBed's sweep: algorithms x test-env settings x hparams x trials per dataset.
    Single-source sweep: algorithms x source domains (all, or `sources`) x hparams x trials.
    """
    args = stage.variant(reduced).args
    if stage.runner_name in ONE_JOB_RUNNERS:
        return {None: 1}
    seeds = args.get("n_hparams", 20) - args.get("n_hparams_from", 0)
    trials = args.get("n_trials", 3)
    jobs = {}
    for dataset in args["datasets"]:
        n_envs = num_environments(dataset)
        if stage.runner_name == "single_source_sweep":
            sources = args.get("sources")
            if sources is not None and not all(isinstance(s, int) and 0 <= s < n_envs for s in sources):
                raise SweepDefinitionError(f"sources {sources!r} must be environment indices "
                                           f"0..{n_envs - 1} of {dataset}")
            settings = len(set(sources)) if sources is not None else n_envs
        else:
            settings = n_test_env_settings(n_envs, bool(args.get("single_test_envs", False)))
        jobs[dataset] = len(args["algorithms"]) * settings * seeds * trials
    return jobs


def estimate_cost(experiment: Experiment, reduced: bool) -> Tuple[float, str]:
    """(total cost, unit) of the variant: the sum over stages and datasets of jobs x cost per job."""
    total = 0.0
    for stage in experiment.stages:
        variant = stage.variant(reduced)
        total += sum(n * variant.cost.of(dataset) for dataset, n in count_stage_jobs(stage, reduced).items())
    return total, experiment.stages[0].variant(reduced).cost.unit


def render_flags(args: Mapping[str, Any]) -> List[str]:
    """Command-line tokens of `args`, in order (see the module docstring)."""
    tokens: List[str] = []
    for key, value in args.items():
        if value is True:
            tokens.append(f"--{key}")
        elif isinstance(value, list):
            tokens += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            tokens += [f"--{key}", json.dumps(value, sort_keys=True)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


@dataclass(frozen=True)
class Placeholders:
    """The values given at build time; None shows as <name> in printed commands."""

    data_dir: Optional[str] = None
    output_dir: Optional[str] = None
    command_launcher: Optional[str] = None
    domainbed_root: Optional[str] = None

    def get(self, name: str) -> str:
        """The value of `name`, or `<name>`."""
        value = getattr(self, name)
        return f"<{name}>" if value is None else str(value)


def stage_output_dir(output_dir: Optional[str], stage: Optional[str]) -> Optional[str]:
    """Where a stage runs: output_dir itself for a one-stage experiment, else its subfolder named
    after the stage (absolute, as loss files in DomainBed hparams must be); None stays None."""
    if output_dir is None or stage is None:
        return output_dir
    return os.path.join(os.path.abspath(output_dir), stage)


def _with_stage_folders(value: Any, folders: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _STAGE_REFERENCE.sub(lambda m: folders.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _with_stage_folders(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_stage_folders(v, folders) for v in value]
    return value


def stage_references(value: Any) -> bool:
    """Whether a flag value names an earlier stage's folder (`{stage}`)."""
    return any(_STAGE_REFERENCE.search(text) for text in _strings(value))


def _stage_folder(given: Placeholders, name: Optional[str]) -> str:
    return (stage_output_dir(given.output_dir, name)
            or ("<output_dir>" if name is None else f"<output_dir>/{name}"))


def stage_args(experiment: Experiment, stage: Stage, reduced: bool, given: Placeholders) -> Dict[str, Any]:
    """The stage's flags for its variant, `{stage}` references replaced by those stages' folders."""
    folders = {s.name: _stage_folder(given, s.name) for s in experiment.stages if s.name is not None}
    return _with_stage_folders(stage.variant(reduced).args, folders)


def build_stage_commands(experiment: Experiment, stage: Stage, reduced: bool, given: Placeholders,
                         python: str = "python") -> List[List[str]]:
    """The commands of one stage's variant: the run, then (if the runner has one) the collection.

    `given.output_dir` is the experiment's; the stage runs in `stage_output_dir` of it, and
    `{stage}` references in its flags become those stages' folders (`stage_args`).
    """
    args = stage_args(experiment, stage, reduced, given)
    output_dir = _stage_folder(given, stage.name)
    runner = stage.runner
    run = [python, "-m", runner.module, *([runner.subcommand] if runner.subcommand else []),
           *render_flags(args), "--data_dir", given.get("data_dir"), "--output_dir", output_dir]
    if runner.takes_launcher:
        run += ["--command_launcher", given.get("command_launcher"), "--skip_confirmation"]
    if runner.takes_domainbed_root and given.domainbed_root is not None:
        run += ["--domainbed_root", given.domainbed_root]
    commands = [run]
    if runner.collect_module:
        commands.append([python, "-m", runner.collect_module, "--input_dir", output_dir])
    return commands


def referenced_stages(experiment: Experiment) -> set:
    """The names of the stages whose folder a later stage's flags name (in either variant):
    they must have finished before the later stages start."""
    return {ref for stage in experiment.stages for variant in stage.variants.values()
            for text in _strings(variant.args) for ref in _STAGE_REFERENCE.findall(text)}


def build_commands(experiment: Experiment, reduced: bool, given: Placeholders,
                   python: str = "python") -> List[List[str]]:
    """The commands of the variant, stage after stage (see `build_stage_commands`)."""
    return [command for stage in experiment.stages
            for command in build_stage_commands(experiment, stage, reduced, given, python)]


_PLACEHOLDER = re.compile(r"<[a-z_]+>(/[A-Za-z0-9_.-]+)*")


def format_command(tokens: Sequence[str]) -> str:
    """A command as one shell line (placeholders such as <data_dir> or <output_dir>/meta left
    unquoted)."""
    return " ".join(t if _PLACEHOLDER.fullmatch(t) else shlex.quote(t) for t in tokens)
