"""The paper's experiments as sweep definitions: one TOML file per table or figure in `sweeps/`.

Each file names the command that runs the experiment (`runner`) and two variants of its flags:
`paper`, the paper-scale sweep for a GPU cluster, and `reduced`, a small CPU run on MNIST. A
variant also carries a cost estimate per job and the basis of that estimate.

    title = "..."
    reproduces = "Table 2 (per domain: Table 9)"
    runner = "domainbed_sweep"            # a key of RUNNERS

    [paper.args]                          # the runner's own flags, spelled as on its command line
    datasets = ["PACS", "VLCS"]
    algorithms = ["ERM", "ITL"]
    n_hparams = 20

    [paper.cost]
    unit = "GPU-hours"
    per_job = { default = 2.0, DomainNet = 6.0 }   # or one number
    basis = "why these numbers"

    [reduced.args] / [reduced.cost]       # the same for the reduced variant

Flags are rendered generically: a list as `--flag a b`, `true` as `--flag`, a table as
`--flag '<JSON>'`, anything else as `--flag value`. `data_dir`, `output_dir`,
`command_launcher` and `domainbed_root` are not part of a definition: they are given when the
commands are built. The number of jobs follows DomainBed's conventions (see `count_jobs`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from ..resources import Traversable, shipped

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

VARIANTS = ("paper", "reduced")

# Environments per DomainBed dataset (DomainBed's datasets.num_environments, checked by the tests).
NUM_ENVIRONMENTS: Dict[str, int] = {
    "Debug28": 3, "Debug224": 3, "ColoredMNIST": 3, "RotatedMNIST": 6, "VLCS": 4, "PACS": 4,
    "OfficeHome": 4, "TerraIncognita": 4, "DomainNet": 6,
}

# The flags given when the commands are built, never by a definition.
BUILD_TIME_FLAGS = frozenset({"data_dir", "output_dir", "command_launcher", "domainbed_root",
                              "skip_confirmation"})

# The flags a definition may set, per runner, as spelled on its command line (less the build-time
# ones). Explicit lists: tests/test_paper_sweep.py checks each against its runner's parser.
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
    "submitit_wait", "submitit_name", "submitit_extra"})
# domainbed_itl.scripts.meta_train.
META_TRAIN_FLAGS = frozenset({
    "preset", "dataset", "per_domain_cap", "data_seed", "family", "order", "init", "outer_steps",
    "outer_lr", "outer_optimizer", "aggregate", "aggregate_reduction", "inner_steps",
    "inner_optimizer", "inner_lr", "inner_momentum", "warm_start", "batch_size", "hidden",
    "solver", "neumann_steps", "neumann_alpha", "neumann_form", "cg_maxiter", "cg_tol",
    "hvp_batch", "outer_batch", "eval_size", "max_solver_residual", "reference_every",
    "reference_maxiter", "batched", "device", "seed", "no_progress", "resume", "overwrite"})


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
}


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
class Experiment:
    """One sweep definition file."""

    name: str
    title: str
    reproduces: str
    runner_name: str
    notes: str
    variants: Mapping[str, Variant]
    path: Union[Traversable, str]

    @property
    def runner(self) -> Runner:
        """The runner of this experiment."""
        return RUNNERS[self.runner_name]

    def variant(self, reduced: bool) -> Variant:
        """The `reduced` or the `paper` variant."""
        return self.variants["reduced" if reduced else "paper"]


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
    if runner_name != "meta_train":
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


def parse_experiment(name: str, data: Mapping[str, Any], path: Union[Traversable, str] = "<memory>"
                     ) -> Experiment:
    """An experiment from the parsed TOML `data`; raises SweepDefinitionError on any problem."""
    where = str(path)
    known = {"title", "reproduces", "runner", "notes", *VARIANTS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepDefinitionError(f"{where}: unknown key(s) {', '.join(unknown)}; expected "
                                   f"{', '.join(sorted(known))}")
    runner = _require(data, "runner", str, where)
    if runner not in RUNNERS:
        raise SweepDefinitionError(f"{where}: runner {runner!r} is not one of {', '.join(RUNNERS)}")
    variants = {}
    for variant in VARIANTS:
        table = _require(data, variant, dict, where)
        extra = sorted(set(table) - {"args", "cost"})
        if extra:
            raise SweepDefinitionError(f"{where} [{variant}]: unknown key(s) {', '.join(extra)}; "
                                       "expected args and cost")
        args = _require(table, "args", dict, f"{where} [{variant}]")
        _check_args(args, runner, f"{where} [{variant}.args]")
        cost = _parse_cost(_require(table, "cost", dict, f"{where} [{variant}]"),
                           f"{where} [{variant}.cost]")
        variants[variant] = Variant(variant, dict(args), cost)
    return Experiment(name, _require(data, "title", str, where),
                      _require(data, "reproduces", str, where), runner,
                      data.get("notes", ""), variants, path)


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
    if dataset not in NUM_ENVIRONMENTS:
        raise SweepDefinitionError(
            f"unknown dataset {dataset!r}: expected one of {', '.join(NUM_ENVIRONMENTS)}")
    return NUM_ENVIRONMENTS[dataset]


def n_test_env_settings(n_envs: int, single_test_envs: bool) -> int:
    """How many test-env settings DomainBed's sweep makes: all singles, plus all pairs by default."""
    if single_test_envs:
        return n_envs
    if n_envs < 3:
        raise SweepDefinitionError(f"DomainBed's default sweep needs >= 3 environments, got {n_envs}")
    return n_envs + n_envs * (n_envs - 1) // 2


def count_jobs(experiment: Experiment, reduced: bool) -> Dict[Optional[str], int]:
    """Jobs per dataset of the variant (key None: the one job of a meta-training run).

    DomainBed's sweep: algorithms x test-env settings x hparams x trials per dataset.
    Single-source sweep: algorithms x source domains (all, or `sources`) x hparams x trials.
    """
    args = experiment.variant(reduced).args
    if experiment.runner_name == "meta_train":
        return {None: 1}
    seeds = args.get("n_hparams", 20) - args.get("n_hparams_from", 0)
    trials = args.get("n_trials", 3)
    jobs = {}
    for dataset in args["datasets"]:
        n_envs = num_environments(dataset)
        if experiment.runner_name == "single_source_sweep":
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
    """(total cost, unit) of the variant: the sum over datasets of jobs x cost per job."""
    variant = experiment.variant(reduced)
    total = sum(n * variant.cost.of(dataset) for dataset, n in count_jobs(experiment, reduced).items())
    return total, variant.cost.unit


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


def build_commands(experiment: Experiment, reduced: bool, given: Placeholders,
                   python: str = "python") -> List[List[str]]:
    """The commands of the variant: the run, then (if the runner has one) the collection."""
    runner = experiment.runner
    run = [python, "-m", runner.module, *([runner.subcommand] if runner.subcommand else []),
           *render_flags(experiment.variant(reduced).args),
           "--data_dir", given.get("data_dir"), "--output_dir", given.get("output_dir")]
    if runner.takes_launcher:
        run += ["--command_launcher", given.get("command_launcher"), "--skip_confirmation"]
    if runner.takes_domainbed_root and given.domainbed_root is not None:
        run += ["--domainbed_root", given.domainbed_root]
    commands = [run]
    if runner.collect_module:
        commands.append([python, "-m", runner.collect_module, "--input_dir", given.get("output_dir")])
    return commands


def format_command(tokens: Sequence[str]) -> str:
    """A command as one shell line (placeholders such as <data_dir> left unquoted)."""
    return " ".join(t if t.startswith("<") and t.endswith(">") else shlex.quote(t) for t in tokens)
