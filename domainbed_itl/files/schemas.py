"""The schema of every file format the package reads, in one place; every reader checks with it.

    spec = check(LossFile, json.loads(text), f"loss file {path}")   # SchemaError, or the model

See docs/files.md (file formats and versions; the models and the rules they follow).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Type, TypeVar

import torch
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      model_validator)

LOSS_FORMAT = "domainbed-itl-loss"
LOSS_VERSIONS = (1,)
CHECKPOINT_VERSIONS = (1, 2)
MANIFEST_FORMAT = "domainbed_itl single-source sweep"
MANIFEST_VERSIONS = (1,)
INT64 = 2 ** 63  # integers beyond 64 bits fit no tensor size, seed or step count

Model = TypeVar("Model", bound=BaseModel)


class SchemaError(ValueError):
    """A file, or a part of one, that does not follow its format; the message names where."""


# ------------------------------------------------------------------------------ value types


def _json_value(value: Any) -> Any:
    """`value` if it is plain JSON (None, bool, number, string, list, object with string keys)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ValueError(f"expected an integer that fits in 64 bits, got {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            _json_value(item)
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"an object key must be a string, got {key!r}")
            _json_value(item)
        return value
    raise ValueError(f"expected a plain JSON value, got a {type(value).__name__}")


def _measured(value: float) -> float:
    if not (math.isnan(value) or value >= 0):
        raise ValueError(f"expected a number >= 0 (or NaN, as measured), got {value!r}")
    return value


def _float_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"expected a tensor, got a {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"expected finite values, got a tensor holding {_first_bad(value)}")
    return value


def _first_bad(tensor: torch.Tensor) -> float:
    return float(tensor.flatten()[~torch.isfinite(tensor.flatten())][0])


def _state_value(value: Any) -> Any:
    """An optimiser's state entry: a finite float tensor, a finite number, or None."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return value
    return _float_tensor(value)


def _setting(value: Any) -> Any:
    """An optimiser's setting (lr, momentum, betas, flags): a finite number, a flag, None, a
    string or a list of finite numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            _setting(item)
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    raise ValueError(f"expected a finite number, a flag or a list of numbers, got {value!r}")


def _plain_name(value: str) -> str:
    if value in ("", ".", "..") or re.search(r"[/\\]", value):
        raise ValueError(f"expected a folder name (no path), got {value!r}")
    return value


def _device_type(value: str) -> str:
    try:
        known = torch.device(value).type == value
    except RuntimeError:
        known = False
    if not known:
        raise ValueError(f"expected a torch device type such as 'cpu' or 'cuda', got {value!r}")
    return value


JsonValue = Annotated[Any, AfterValidator(_json_value)]
DeviceType = Annotated[str, AfterValidator(_device_type)]
Finite = float  # the models' allow_inf_nan=False makes every float finite
Measured = Annotated[float, Field(allow_inf_nan=True), AfterValidator(_measured)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Int = Annotated[int, Field(ge=-INT64, lt=INT64)]
Count = Annotated[int, Field(ge=0, lt=INT64)]
Positive = Annotated[int, Field(ge=1, lt=INT64)]
FloatTensor = Annotated[Any, AfterValidator(_float_tensor)]
StateValue = Annotated[Any, AfterValidator(_state_value)]
Setting = Annotated[Any, AfterValidator(_setting)]
FolderName = Annotated[str, AfterValidator(_plain_name)]


class Schema(BaseModel):
    """A format: strict types, finite floats, unknown fields refused."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)


class Carried(Schema):
    """A format that is written back as it was read (unknown fields carried on unread): every
    value, checked fields included, must be plain JSON."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: Dict[str, JsonValue] = Field(init=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        return _json_value(data)


# --------------------------------------------------------------------------------- checking


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _location(parts: Tuple) -> str:
    """A field's location as `a.b.0`, a key that is not a plain word quoted."""
    return ".".join(str(p) if re.fullmatch(r"\w+", str(p)) else repr(p) for p in parts)


def _message(error: Dict[str, Any]) -> str:
    where = _location(error["loc"])
    what = error["msg"].removeprefix("Value error, ")
    if not where:  # a check of the whole object (a model validator): its message says it all
        return what
    if error["type"] == "extra_forbidden":
        return f"{where}: not a field of this format"
    what = what[0].lower() + what[1:]
    return f"{where}: {what}" if "got " in what else f"{where}: {what} (got {_describe(error['input'])})"


def check_version(data: Any, supported: Tuple[int, ...], where: str, default: int = 1) -> int:
    """The format version of `data` (`default` when it names none); SchemaError naming the
    versions this package reads unless it is one of `supported`."""
    version = data.get("version", default) if isinstance(data, dict) else default
    if type(version) is not int or version not in supported:
        newer = type(version) is int and version > max(supported)
        raise SchemaError(f"{where}: format version {_describe(version)} is not one this version of "
                          f"domainbed-itl reads ({', '.join(map(str, supported))})"
                          + ("; it was written by a newer domainbed-itl: upgrade to read it"
                             if newer else ""))
    return version


def check(schema: Type[Model], data: Any, where: str) -> Model:
    """`data` validated as `schema`; SchemaError with one line: `where`, the missing fields,
    then per problem the field, what is wrong and the value (three problems at most; `and N
    more` counts the others)."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        missing = [_location(e["loc"]) for e in error.errors() if e["type"] == "missing"]
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + [
            _message(e) for e in error.errors() if e["type"] != "missing"]
        more = [f"and {len(problems) - 3} more"] if len(problems) > 3 else []
        raise SchemaError(f"{where}: " + "; ".join(problems[:3] + more)) from None


# -------------------------------------------------------------------------------- loss files


class LossFile(Schema):
    """A loss file: format and version (default 1, for files written by hand), family, order
    (None for families without orders), parameters, provenance."""

    format: Literal["domainbed-itl-loss"] = LOSS_FORMAT
    version: Literal[1] = 1
    family: str
    order: Optional[Int] = None
    parameters: List[Finite] = Field(min_length=1)
    provenance: Dict[str, JsonValue] = {}


# ------------------------------------------------------------------------ metrics records


Reading = Annotated[float, Field(allow_inf_nan=True)]  # a diagnostic's value, NaN or ∞ as measured


def mean_of(key: str, default: Any = None) -> Any:
    """A record field that is the average over the domains of per_domain[key]."""
    return Field(default, json_schema_extra={"mean_of": key})


class Reference(Schema):
    """The MINRES reference of a metrics record: the domain compared, the cosine and norm ratio
    of its hypergradient to the reference's, the reference's residual and iterations."""

    model_config = ConfigDict(extra="ignore")
    domain: Optional[Count] = None
    cosine: Reading
    norm_ratio: Optional[Reading] = None
    reference_residual: Optional[Reading] = None
    reference_maxiter: Optional[Positive] = None


class PerDomain(Schema):
    """A metrics record's values per domain (one per held-out domain, in domain order); an outer
    step's record holds all but the optional diagnostics, a CMA-ES candidate's the held-out ones."""

    model_config = ConfigDict(extra="ignore")
    inner_source_acc: Optional[List[Fraction]] = None
    heldout_acc: List[Fraction] = Field(min_length=1)
    heldout_loss: Optional[List[float]] = None  # M, the objective
    heldout_ce: Optional[List[Reading]] = None
    source_heldout_gap: Optional[List[Annotated[float, Field(ge=-1, le=1)]]] = None
    inner_loss: Optional[List[Reading]] = None
    inner_grad_norm: Optional[List[Reading]] = None
    inner_grad_norm_start: Optional[List[Reading]] = None
    stationarity: Optional[List[Reading]] = None  # inner_grad_norm / inner_grad_norm_start
    inner_steps_used: Optional[List[Count]] = None
    solver_residual: Optional[List[Reading]] = None
    hypergradient_norm: Optional[List[Reading]] = None
    hessian_lambda_max: Optional[List[Reading]] = None  # with spectrum_iters
    hessian_lambda_min: Optional[List[Reading]] = None
    hypergradient: Optional[List[List[Reading]]] = None  # families of few parameters
    inner_at_cap: Optional[List[bool]] = None  # with a stopping rule


class MetricsRecord(Schema):
    """A line of metrics.jsonl: an outer step's record (built here, in this field order, by
    meta.trainer) or a CMA-ES generation's. The fields `mean_of` a per-domain key average it;
    the diagnostics are there when recorded. A reader drops fields it does not know."""

    model_config = ConfigDict(extra="ignore")
    step: Positive
    inner_source_acc: Fraction = mean_of("inner_source_acc", ...)
    outer_heldout_acc: Fraction = mean_of("heldout_acc", ...)
    outer_heldout_loss: float = mean_of("heldout_loss", ...)  # M (held-out CE in earlier releases)
    outer_heldout_ce: Optional[Annotated[float, Field(ge=0)]] = mean_of("heldout_ce")
    source_heldout_gap: Optional[Annotated[float, Field(ge=-1, le=1)]] = mean_of("source_heldout_gap")
    inner_loss: Optional[Reading] = mean_of("inner_loss")
    hypergradient_norm: Optional[Reading] = None  # of the update
    inner_grad_norm: Optional[Reading] = mean_of("inner_grad_norm")
    inner_grad_norm_ratio: Optional[Measured] = mean_of("stationarity")
    inner_steps_used: Optional[Annotated[float, Field(ge=0)]] = mean_of("inner_steps_used")
    solver_residual: Optional[Measured] = mean_of("solver_residual")
    hessian_lambda_max: Optional[Reading] = mean_of("hessian_lambda_max")
    hessian_lambda_min: Optional[Reading] = mean_of("hessian_lambda_min")
    trusted_domains: Optional[Count] = None
    omega: Optional[List[Finite]] = None  # after the step's update
    per_domain: Optional[PerDomain] = None
    time_inner_s: Optional[Reading] = None
    time_hypergradient_s: Optional[Reading] = None
    time_eval_s: Optional[Reading] = None
    time_diagnostics_s: Optional[Reading] = None
    time_step_s: Optional[Annotated[float, Field(ge=0)]] = None
    objective: Optional[str] = None
    omega_evaluated: Optional[List[Finite]] = None
    aggregator_removed: Optional[Reading] = None
    aggregator_norm_ratio: Optional[Reading] = None
    aggregator_fallback: Optional[str] = None  # why the plain mean replaced the aggregate
    inner_at_cap: Optional[Count] = None  # networks that met no stopping rule
    projected: Optional[List[str]] = None
    reference: Optional[Reference] = None
    inner_trainings: Optional[Positive] = None
    popsize: Optional[Annotated[int, Field(ge=2, lt=INT64)]] = None

    @classmethod
    def means(cls) -> Dict[str, str]:
        """The fields that average a per-domain value: field name -> per-domain key."""
        return {name: field.json_schema_extra["mean_of"] for name, field in cls.model_fields.items()
                if isinstance(field.json_schema_extra, dict) and "mean_of" in field.json_schema_extra}

    @classmethod
    def build(cls, **fields: Any) -> "MetricsRecord":
        """A record to write, from exactly its fields (and per_domain's): an unknown one is a
        TypeError, a wrong value a SchemaError."""
        for known, given, where in ((cls.model_fields, fields, "a metrics record"),
                                    (PerDomain.model_fields, fields.get("per_domain") or {}, "per_domain"),
                                    (Reference.model_fields, fields.get("reference") or {}, "reference")):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise TypeError(f"{where} has no field {', '.join(unknown)}")
        return check(cls, fields, "metrics record")

    def line(self) -> Dict[str, Any]:
        """The record as written: the fields given to `build`, in the schema's order."""
        return self.model_dump(exclude_unset=True)


class CarriedPerDomain(Carried, PerDomain):
    """PerDomain in a checkpoint's record: the other lists carried, as plain JSON."""

    model_config = ConfigDict(extra="allow")


class CarriedReference(Carried, Reference):
    """Reference in a checkpoint's record: the other values carried, as plain JSON."""

    model_config = ConfigDict(extra="allow")


class CarriedRecord(Carried, MetricsRecord):
    """A metrics record kept in a checkpoint: MetricsRecord's fields checked, the rest plain JSON
    (a resume writes them to metrics.jsonl again)."""

    model_config = ConfigDict(extra="allow")
    per_domain: Optional[CarriedPerDomain] = None
    reference: Optional[CarriedReference] = None


# ---------------------------------------------------------------------------- checkpoints


class Checkpoint(Schema):
    """The envelope of every run-folder checkpoint (see files/runfolder.py). Version 1 had no
    unit, done, device or provenance."""

    model_config = ConfigDict(extra="allow")
    format: str
    version: Literal[1, 2] = 1
    package_version: Optional[str] = None
    unit: Optional[str] = None
    done: Optional[Count] = None
    device: Optional[DeviceType] = None  # the library runs on any torch device; commands on cpu, cuda
    provenance: Optional[Dict[str, JsonValue]] = None

    @model_validator(mode="after")
    def _version_2_fields(self) -> "Checkpoint":
        missing = [k for k in ("unit", "done", "provenance") if getattr(self, k) is None]
        if self.version == 2 and missing:
            raise ValueError(f"a version 2 checkpoint needs {', '.join(missing)}")
        if (self.unit is None) != (self.done is None):
            raise ValueError("a checkpoint's progress needs both done and unit")
        return self


class DataFingerprint(Schema):
    """The data a run was computed on (meta.runner.data_fingerprint)."""

    dataset: str
    environments: List[str] = Field(min_length=2)
    num_classes: Annotated[int, Field(ge=2, lt=INT64)]
    domain_sizes: List[Positive] = Field(min_length=2)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ParamGroup(Schema):
    """A torch optimiser's parameter group: its parameters' indices and its settings."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: Dict[str, Setting] = Field(init=False)
    params: List[Count]
    lr: Annotated[float, Field(gt=0)]


class OptimizerState(Schema):
    """A torch optimiser's state_dict: per parameter index, its buffers; its groups."""

    state: Dict[int, Dict[str, StateValue]]
    param_groups: List[ParamGroup] = Field(min_length=1)


class InnerState(Schema):
    """Warm-started inner networks: their stacked parameters and optimiser state."""

    params: Dict[str, FloatTensor] = Field(min_length=1)
    optimizer: Dict[str, Any]

    @model_validator(mode="after")
    def _buffers(self) -> "InnerState":
        for key, value in self.optimizer.items():
            if key == "step":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"optimizer.step must be an integer >= 0, got {value!r}")
            elif not isinstance(value, dict) or set(value) != set(self.params):
                raise ValueError(f"optimizer.{key} must hold a buffer per parameter "
                                 f"({', '.join(self.params)})")
            else:
                for tensor in value.values():
                    _float_tensor(tensor)
        return self


class TrainerState(Schema):
    """MetaTrainer.state_dict()."""

    steps_done: Count
    omega: FloatTensor
    optimizer: OptimizerState
    inner: Optional[InnerState] = None


class RunState(Checkpoint):
    """What a search's checkpoint holds besides its state: data, initial ω, records."""

    model_config = ConfigDict(extra="forbid")
    data: DataFingerprint
    init_omega: List[Finite] = Field(min_length=1)
    metrics: List[CarriedRecord]

    @model_validator(mode="after")
    def _records_in_order(self) -> "RunState":
        steps = [record.step for record in self.metrics]
        if steps != list(range(1, len(steps) + 1)):
            raise ValueError(f"metrics records must be steps 1, 2, ..., got steps {steps[:10]}")
        if self.done is not None and self.done != len(steps):
            raise ValueError(f"done is {self.done} but the checkpoint holds {len(steps)} records")
        return self


class MetaCheckpoint(RunState):
    """A meta-training checkpoint (meta/runner.py). `config` is checked by MetaConfig."""

    config: Dict[str, JsonValue]
    trainer: TrainerState

    @model_validator(mode="after")
    def _steps(self) -> "MetaCheckpoint":
        if self.trainer.steps_done != len(self.metrics):
            raise ValueError(f"trainer.steps_done is {self.trainer.steps_done} but the checkpoint "
                             f"holds {len(self.metrics)} records")
        return self


class Incumbent(Schema):
    """The best candidate of a CMA-ES search so far."""

    omega: List[Finite] = Field(min_length=2)
    generation: Positive
    result: Dict[str, JsonValue]

    @model_validator(mode="after")
    def _fitness(self) -> "Incumbent":
        loss = self.result.get("outer_heldout_loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ValueError(f"result.outer_heldout_loss must be a finite number, got {loss!r}")
        return self


class CMAGeneration(Schema):
    """A generation of a CMA-ES search: its candidates and the fitnesses told for them."""

    candidates: List[List[Finite]] = Field(min_length=1)
    fitnesses: List[Finite] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_fitness_each(self) -> "CMAGeneration":
        if len(self.fitnesses) != len(self.candidates):
            raise ValueError(f"{len(self.fitnesses)} fitnesses for {len(self.candidates)} "
                             "candidates")
        return self


class CMAState(Schema):
    """CMASearch.state_dict(): generations done, the incumbent, each generation's candidates and
    fitnesses (`es`, the pickled strategy in earlier releases' checkpoints, is read only to be
    refused)."""

    generations_done: Count
    best: Optional[Incumbent]
    history: Optional[List[CMAGeneration]] = None
    es: Optional[bytes] = None


class CMASettings(Schema):
    """The CMA-ES settings of a search (meta/cmaes.py CMAConfig)."""

    generations: Positive
    popsize: Optional[Annotated[int, Field(ge=2, lt=INT64)]]
    sigma0: Annotated[float, Field(gt=0)]
    seed: Count


class CMACheckpoint(RunState):
    """A CMA-ES checkpoint (meta/cmaes.py); `meta_config` is checked by MetaConfig."""

    cma_config: CMASettings
    meta_config: Dict[str, JsonValue]
    search: CMAState

    @model_validator(mode="after")
    def _generations(self) -> "CMACheckpoint":
        if self.search.generations_done != len(self.metrics):
            raise ValueError(f"search.generations_done is {self.search.generations_done} but the "
                             f"checkpoint holds {len(self.metrics)} records")
        if self.search.generations_done and self.search.best is None:
            raise ValueError("search.best is missing after a generation")
        return self


class EvaluationRecord(Schema):
    """One record of the loss evaluation's meta protocol (meta/evaluate.py)."""

    loss: str
    unit: Int
    domain: str
    domain_index: Count
    inner_steps: Positive
    heldout_acc: Fraction
    heldout_ce: Measured
    source_acc: Fraction
    gap: Annotated[float, Field(ge=-1, le=1)]
    final_train_loss: Annotated[float, Field(allow_inf_nan=True)]
    inner_steps_used: Optional[Positive] = None  # absent in earlier releases' records
    stationarity: Optional[Measured] = None  # with a stopping rule only


class EvaluationUnit(Schema):
    """A finished unit of the evaluation: a loss on a seed, its definition and records."""

    unit: Int
    loss: str
    definition: Dict[str, JsonValue]
    records: List[EvaluationRecord] = Field(min_length=1)


class EvaluationSettings(Schema):
    """The settings a loss evaluation's units were computed with (compared on a resume)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: Dict[str, JsonValue] = Field(init=False)
    data: DataFingerprint


class EvaluationCheckpoint(Checkpoint):
    """A loss evaluation's checkpoint (meta/evaluate.py)."""

    model_config = ConfigDict(extra="forbid")
    settings: EvaluationSettings
    units: List[EvaluationUnit]

    @model_validator(mode="after")
    def _units(self) -> "EvaluationCheckpoint":
        keys = [(u.unit, u.loss) for u in self.units]
        if len(set(keys)) != len(keys):
            raise ValueError("units: a (seed, loss) unit appears twice")
        if self.done is not None and self.done != len(keys):
            raise ValueError(f"done is {self.done} but the checkpoint holds {len(keys)} units")
        return self


# ------------------------------------------------------------------ single-source manifests


class ManifestJob(Schema):
    """A job of the single-source sweep's manifest (files/sweepfolder.py PlannedJob)."""

    folder: FolderName
    dataset: str
    algorithm: str
    source: Count
    trial_seed: Int
    hparams_seed: Int
    n_envs: Annotated[int, Field(ge=2, lt=INT64)]

    @model_validator(mode="after")
    def _source_in_range(self) -> "ManifestJob":
        if self.source >= self.n_envs:
            raise ValueError(f"source {self.source} is not one of the {self.n_envs} domains")
        return self


class Manifest(Schema):
    """The manifest: format, version and the jobs (each checked on its own, as ManifestJob)."""

    format: Literal["domainbed_itl single-source sweep"]
    version: Literal[1] = 1
    jobs: List[Dict[str, Any]]


# ------------------------------------------------------------------- DomainBed's records


class RecordArgs(Carried):
    """The `args` of a DomainBed train record that the package reads (the rest is carried)."""

    dataset: str
    algorithm: str
    test_envs: List[Count]
    trial_seed: Int
    hparams_seed: Int
    output_dir: Optional[str] = None
    task: Optional[str] = None


class DomainBedRecord(Carried):
    """A line of DomainBed's results.jsonl as the reports read it: step, args and the
    env<i>_in_acc and env<i>_out_acc accuracies of 2 or more domains."""

    step: Count
    args: RecordArgs

    @model_validator(mode="after")
    def _accuracies(self) -> "DomainBedRecord":
        extra = self.__pydantic_extra__ or {}
        n = 0
        while f"env{n}_out_acc" in extra:
            n += 1
        if n < 2:
            raise ValueError("no env<i>_out_acc accuracies for 2 or more domains")
        bad = [f"env{e}_{split}_acc" for e in range(n) for split in ("in", "out")
               if not _is_fraction(extra.get(f"env{e}_{split}_acc"))]
        if bad:
            raise ValueError(f"{', '.join(bad)} missing or not accuracies in [0, 1]")
        if any(e >= n for e in self.args.test_envs):
            raise ValueError(f"test_envs {self.args.test_envs} name domains beyond the {n} recorded")
        return self


def _is_fraction(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= 1)
