"""The property tests' harness (tests/commands/test_properties*.py): hypothesis settings and
strategies of damaged values, a sandbox, in-process command calls and the checks every command
must pass (docs/testing.md)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import pickle
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from domainbed_itl.files.runfolder import load_checkpoint, read_metrics
from domainbed_itl.losses import LossSpec, get_family, load_loss
from domainbed_itl.losses.taylor import ITL_PARAMETERS
from domainbed_itl.meta.cmaes import CMA_RUN
from domainbed_itl.meta.evaluate import EVALUATION_RUN
from domainbed_itl.meta.runner import META_RUN
from domainbed_itl.scripts import (cma_search, collect_single_source, evaluate_loss, grid_search,
                                   in_vs_cross, loss_landscape, loss_shapes, meta_train,
                                   paper_sweep, patch, quickstart, significance,
                                   single_source_sweep, target_entropy)


FIXTURE = Path(__file__).resolve().parent / "data" / "single_source_debug28"
# DOMAINBED_ITL_EXAMPLES=10 runs ten times the examples, with fresh random draws each time.
SCALE = int(os.environ.get("DOMAINBED_ITL_EXAMPLES", "1"))
SOME = settings(max_examples=12 * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(SOME, max_examples=60 * SCALE)
CHECKPOINTS = settings(SOME, max_examples=25 * SCALE)  # about 1 in 5 damaged checkpoints resumes
DATA = ["--dataset", "synthetic", "--per_domain_cap", "20"]
INNER = ["--inner_steps", "2", "--hidden", "4", "--eval_size", "16", "--no_progress"]
META = [*DATA, *INNER, "--hvp_batch", "16", "--outer_steps", "2"]
CMA = [*DATA, *INNER, "--generations", "1", "--popsize", "3"]
EVALUATION = ["meta", "--losses", "CE", "ITL", "--seeds", "0", *DATA, *INNER]

# ---------------------------------------------------------------------------- strategies

# Numbers: small, or beyond any memory; never a size that would start a long computation.
INTEGERS = st.integers(-3, 3) | st.integers(10 ** 15, 10 ** 16) | st.integers(2 ** 63, 2 ** 70)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, -1.0, 1e300])
SCALARS = st.none() | st.booleans() | INTEGERS | FLOATS | st.text(max_size=6)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)
TENSORS = st.sampled_from([torch.tensor([math.nan, 1.0]), torch.tensor([1, 2]), torch.zeros(3, 4),
                           torch.tensor(math.inf), torch.zeros(0)])
VALUES = JSON | TENSORS | st.just(b"\x80junk")
FLAG_TEXT = st.sampled_from(["0", "-1", "1", "2", "3", "0.5", "1e30", "nan", "inf", "-inf", "",
                             "x", "1,2", "0,4", "99999999999999999999", "1000000000000000", "/",
                             "{}", "[]", '{"a": 1}', "cuda", "cpu", "ITL", "CE", "taylor4",
                             "focal", "sce", "poly1", "Focal:gamma=nan",
                             "mine.txt", "mine.txt/t.md"]) | st.text(max_size=8)


def _paths(value: Any, prefix: Tuple = ()) -> Iterator[Tuple]:
    """Every key path into nested dicts and lists (the root excluded)."""
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        yield (*prefix, key)
        yield from _paths(item, (*prefix, key))


@st.composite
def damaged(draw: Callable, valid: Dict[str, Any], values: st.SearchStrategy = JSON) -> Dict[str, Any]:
    """`valid` with one to three fields replaced, deleted, or added (new values from `values`)."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(data)) or [("added",)]))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return data


# ---------------------------------------------------------------------------------- harness


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder, the working directory for the block."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(before)


def snapshot(root: Path, outputs: Sequence[Path]) -> Dict[str, str]:
    """Every entry under `root` but `outputs` (and what they hold): the bytes' hash of a file."""
    state = {}
    for path in sorted(root.rglob("*")):
        if any(path == out or out in path.parents for out in outputs):
            continue
        state[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest()
                                              if path.is_file() else "folder")
    return state


def call(main: Callable, argv: List[str]) -> Tuple[int, str]:
    """(exit status, stderr) of `main(argv)` in this process."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
    return code, err.getvalue()


def check_boundary(code: int, err: str) -> None:
    """No traceback; 0, or 1 or 2 with one error line, the last line printed."""
    assert "Traceback" not in err and "this is a bug" not in err, err
    assert code in (0, 1, 2), (code, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    if code == 0:
        assert errors == [], err
    else:
        assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0].rstrip(), err


def run_checked(main: Callable, argv: List[str], root: Path, outputs: Sequence[Path]) -> int:
    """Run a command in the sandbox `root`; check the boundary and that nothing but `outputs`
    changed; its exit status."""
    before = snapshot(root, outputs)
    code, err = call(main, argv)
    check_boundary(code, err)
    assert snapshot(root, outputs) == before, err
    if currently_in_test_context():  # counted by --hypothesis-show-statistics
        event(f"exit {code}")
    return code


# ---------------------------------------------------------------------- loss files


VALID_LOSS = {"format": "domainbed-itl-loss", "version": 1, "family": "taylor", "order": 4,
              "parameters": list(ITL_PARAMETERS), "provenance": {"steps": 200}}


def check_loss_spec(spec: LossSpec) -> None:
    """What a read loss holds: a registered family's count of finite parameters in range."""
    family = get_family(spec.family, spec.order)
    assert len(spec.parameters) == family.num_params
    assert all(isinstance(v, float) and math.isfinite(v) for v in spec.parameters)
    family.check(spec.parameters)


def check_run_outputs(folder: Path, kind) -> None:
    """A run's files read back through the package's readers (and so hold their schemas)."""
    load_checkpoint(folder / "checkpoint.pt", kind)
    if (folder / "metrics.jsonl").exists():
        read_metrics(folder / "metrics.jsonl")
        check_loss_spec(load_loss(folder / "loss.json"))
    check_json_outputs(folder)


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in a JSON output (JSON has no NaN nor infinity)")


def check_json_outputs(folder: Path) -> None:
    """Every JSON file a command wrote is standard JSON (no NaN nor infinities)."""
    for path in folder.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=_no_constant)


RESUMES = {"meta": (META_RUN, meta_train.main, ["--resume", "--outer_steps", "2", "--no_progress"]),
           "cma": (CMA_RUN, cma_search.main, ["--resume", "--generations", "1", "--no_progress"]),
           "evaluation": (EVALUATION_RUN, evaluate_loss.main, EVALUATION)}


# ------------------------------------------------------------------------- command lines


def fuzzed(base: List[str], flags: Sequence[str]) -> st.SearchStrategy:
    """`base` with one to three of `flags` given random values."""
    chosen = st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True)
    return chosen.flatmap(lambda names: st.tuples(*[FLAG_TEXT for _ in names]).map(
        lambda values: [*base, *(w for n, v in zip(names, values) for w in (f"--{n}", v))]))


SEARCH_FLAGS = ["inner_lr", "inner_momentum", "inner_optimizer", "batch_size", "hidden",
                "outer_batch", "eval_size", "per_domain_cap", "data_seed", "seed", "device",
                "family", "order", "init", "batched"]
COMMANDS = {
    "meta_train": (meta_train.main, [*META[:-2], "--outer_steps", "1"],
                   [*SEARCH_FLAGS, "outer_lr", "hvp_batch", "neumann_steps", "neumann_alpha",
                    "cg_tol", "solver", "aggregate", "max_solver_residual", "outer_optimizer"]),
    "cma_search": (cma_search.main, CMA, [*SEARCH_FLAGS, "popsize", "sigma0"]),
    "evaluate_loss": (evaluate_loss.main, EVALUATION,
                      ["batch_size", "eval_size", "per_domain_cap", "data_seed", "inner_lr",
                       "hidden", "reference", "device", "inner_steps", "seeds", "losses"]),
    "grid_search": (grid_search.main, ["--grid", "label_smoothing=0.1", "--seeds", "0", *DATA, *INNER],
                    ["grid", "losses", "reference", "seeds", "inner_steps", "batch_size",
                     "eval_size", "per_domain_cap", "inner_lr", "hidden", "device"]),
    "loss_shapes": (loss_shapes.main, ["--losses", "CE", "ITL", "--points", "5"],
                    ["num_classes", "points", "p_min", "p_max", "labels", "losses"]),
    "significance": (significance.main, ["--single_source_dir", FIXTURE],
                     ["alpha", "blocks", "algorithms", "datasets"]),
    "collect_single_source": (collect_single_source.main, ["--input_dir", FIXTURE],
                              ["algorithms", "datasets", "output"]),
    "quickstart": (quickstart.main, ["--dry_run"], ["steps", "n_hparams", "n_trials", "hparams",
                                                    "algorithms", "datasets", "data_dir"]),
    "single_source_sweep": (single_source_sweep.main,
                            ["launch", "--command_launcher", "dummy", "--skip_confirmation",
                             "--data_dir", "."], ["n_trials", "n_hparams", "steps", "hparams",
                                                  "sources", "algorithms", "datasets",
                                                  "holdout_fraction", "domainbed_root"]),
    "paper_sweep": (paper_sweep.main, ["show", "table4_single_source"],
                    ["command_launcher", "data_dir"]),
    "patch": (patch.main, ["check"], ["domainbed_root", "patches_dir"]),
    "target_entropy": (target_entropy.main, ["."], ["batch_size", "device", "algorithms"]),
    "in_vs_cross": (in_vs_cross.main, ["."], ["batch_size", "device", "data_dir"]),
    "loss_landscape": (loss_landscape.main, ["."], ["examples", "radius", "points", "batch_size"]),
}
RUN_KINDS = {"meta_train": META_RUN, "cma_search": CMA_RUN, "evaluate_loss": EVALUATION_RUN,
             "grid_search": grid_search.GRID_RUN}
OUTPUT_FLAG = {"collect_single_source": None, "quickstart": "--workdir", "paper_sweep": None,
               "patch": None}


NEEDS_DOMAINBED = {"in_vs_cross", "loss_landscape", "patch", "single_source_sweep", "target_entropy"}


# ------------------------------------------------------------------- trust boundaries


class Hostile:
    """An object whose unpickling runs code: it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_bytes(marker: Path, how: str, checkpoint: Dict[str, Any]) -> bytes:
    """A file that runs code when unpickled: a bare pickle, or a torch file holding the object
    alone or in place of a part of a real checkpoint."""
    if how == "pickle":
        return pickle.dumps(Hostile(marker))
    buffer = io.BytesIO()
    torch.save(Hostile(marker) if how == "torch" else {**checkpoint, how: Hostile(marker)}, buffer)
    return buffer.getvalue()
