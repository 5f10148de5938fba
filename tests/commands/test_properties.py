"""Property-based tests (hypothesis) of every reader and every command line.

Random and damaged loss files, metrics records, checkpoints (torch.save'd dicts with damaged
fields), DomainBed records, sweep manifests and flag values:

- never produce a traceback: a reader returns a checked value or raises its own error, a
  command exits 0, or 1 or 2 with one `error:` line (the last one it prints);
- never change a file outside the command's output (a snapshot of the folder around it: every
  file's bytes, every folder);
- never exit 0 with a result built from an unchecked value: what a reader returns holds its
  schema's invariants, and what a command wrote when it exits 0 reads back through the
  package's own (schema-checked) readers.

Each property can fail: an undamaged run resumes with status 0 (so a refusal of everything would
be caught), and the examples include accepted ones (`--hypothesis-show-statistics` counts the
exit statuses). Fast enough for CI: few examples per property, derandomized (the same examples
on every run, so a failure is reproducible; DOMAINBED_ITL_EXAMPLES=N draws N times as many, at
random), in-process `main(argv)` calls with tiny synthetic settings, and the runs whose
checkpoints are damaged are made once per module and resumed with nothing left to train.
Numbers drawn for flags and damaged fields are small or absurd (beyond any memory), never in
between, so that an accepted value cannot start a long computation.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS, LossHparamError, check_loss_hparams
from domainbed_itl.files import atomic
from domainbed_itl.files.runfolder import load_checkpoint, read_metrics
from domainbed_itl.files.sweepfolder import (MANIFEST_NAME, load_runs, mixed_runs, read_manifest,
                                            record_problem)
from domainbed_itl.losses import LossFileError, LossSpec, TaylorLoss, get_family, load_loss
from domainbed_itl.losses.taylor import ITL_PARAMETERS
from domainbed_itl.meta.cmaes import CMA_RUN
from domainbed_itl.meta.evaluate import EVALUATION_RUN
from domainbed_itl.meta.runner import META_RUN
from domainbed_itl.scripts import (cma_search, collect_single_source, evaluate_loss, grid_search,
                                   in_vs_cross, loss_landscape, loss_shapes, meta_train,
                                   paper_sweep, patch, plot_meta, plot_search, quickstart,
                                   significance, single_source_sweep, target_entropy)

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "single_source_debug28"
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


@MANY
@given(content=damaged(VALID_LOSS).map(json.dumps) | JSON.map(json.dumps) | st.binary(max_size=40))
def test_a_loss_file_is_read_checked_or_refused(content):
    with sandbox() as root:
        path = root / "loss.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            check_loss_spec(load_loss(path))
        except LossFileError as error:
            assert str(path) in str(error) and "\n" not in str(error)


@SOME
@given(content=damaged(VALID_LOSS))
def test_loss_shapes_on_a_damaged_loss_file(content):
    with sandbox() as root:
        (root / "loss.json").write_text(json.dumps(content))
        code = run_checked(loss_shapes.main, ["--losses", "CE", root / "loss.json", "--points", "5",
                                              "--output_dir", root / "out"], root, [root / "out"])
        if code == 0:
            check_loss_spec(load_loss(root / "loss.json"))
            assert json.loads((root / "out" / "loss_shapes.json").read_text())["losses"]


@MANY
@given(parameters=st.lists(FLOATS | INTEGERS | st.text(max_size=2), min_size=11, max_size=13),
       order=INTEGERS)
def test_the_loss_api_refuses_what_it_cannot_compute(parameters, order):
    try:
        loss = TaylorLoss(parameters, order)
    except ValueError:
        assert not all(isinstance(v, (int, float)) and math.isfinite(v) for v in parameters) or (
            order not in range(2, 6) or len(parameters) != get_family("taylor", order).num_params)
        return
    assert bool(torch.isfinite(loss.omega).all()) and loss.omega.tolist() == pytest.approx(
        [float(v) for v in parameters], rel=1e-6)


@MANY
@given(algorithm=st.sampled_from(sorted(LOSS_ALGORITHMS)),
       hparams=st.dictionaries(st.sampled_from(["itl_loss", "focal_gamma", "sce_alpha", "sce_beta",
                                                "gce_q", "ls_epsilon", "poly_epsilon"]), SCALARS))
def test_the_algorithms_loss_hparams_are_checked_or_refused(algorithm, hparams):
    try:
        loss = check_loss_hparams(algorithm, hparams, num_classes=3)
    except LossHparamError as error:
        assert "\n" not in str(error)
        return
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert bool(torch.isfinite(loss(logits, target)).all())


# ------------------------------------------------------------------ the runs to damage


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A finished meta-training run, CMA-ES search and loss evaluation (its reports removed, so
    that running it again continues from its checkpoint)."""
    root = tmp_path_factory.mktemp("runs")
    for main, argv, name in ((meta_train.main, META, "meta"), (cma_search.main, CMA, "cma"),
                             (evaluate_loss.main, EVALUATION, "evaluation")):
        code, err = call(main, [*argv, "--output_dir", root / name])
        assert code == 0, err
    for report in ("evaluation.md", "evaluation.json"):
        (root / "evaluation" / report).unlink()
    return root


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


def _resume_damaged(runs: Path, name: str, damage: Callable[[Dict[str, Any]], Any]) -> int:
    """Resume a copy of the run `name` whose checkpoint `damage` replaced; its exit status."""
    kind, main, argv = RESUMES[name]
    with sandbox() as root:
        folder = root / name
        shutil.copytree(runs / name, folder)
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
        torch.save(damage(checkpoint), folder / "checkpoint.pt")
        code = run_checked(main, [*argv, "--output_dir", folder], root, [folder])
        if code == 0:
            check_run_outputs(folder, kind)
        return code


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_an_undamaged_run_resumes(runs, name):
    """The properties below are not vacuous: a checkpoint left as written is resumed."""
    assert _resume_damaged(runs, name, lambda checkpoint: checkpoint) == 0


@CHECKPOINTS
@given(data=st.data())
def test_a_damaged_meta_training_checkpoint_is_resumed_checked_or_refused(runs, data):
    _resume_damaged(runs, "meta", lambda checkpoint: data.draw(damaged(checkpoint, VALUES)))


@CHECKPOINTS
@given(data=st.data())
def test_a_damaged_cma_checkpoint_is_resumed_checked_or_refused(runs, data):
    _resume_damaged(runs, "cma", lambda checkpoint: data.draw(damaged(checkpoint, VALUES)))


@CHECKPOINTS
@given(data=st.data())
def test_a_damaged_evaluation_checkpoint_is_continued_checked_or_refused(runs, data):
    _resume_damaged(runs, "evaluation", lambda checkpoint: data.draw(damaged(checkpoint, VALUES)))


# ---------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def records(runs) -> List[Dict[str, Any]]:
    """The meta-training run's metrics records, as written."""
    return [json.loads(line) for line in (runs / "meta" / "metrics.jsonl").read_text().splitlines()]


def check_metrics(records: List[Dict[str, Any]]) -> None:
    """What read_metrics returns: records in increasing step order, accuracies in [0, 1], M
    finite and >= 0."""
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and all(type(s) is int and s >= 1 for s in steps)
    for r in records:
        assert all(0 <= r[k] <= 1 for k in ("inner_source_acc", "outer_heldout_acc"))
        assert math.isfinite(r["outer_heldout_loss"]) and r["outer_heldout_loss"] >= 0


@settings(SOME, max_examples=8 * SCALE)  # each readable file is plotted twice
@given(data=st.data(), extra=st.lists(JSON.map(json.dumps) | st.text(max_size=10), max_size=2))
def test_a_damaged_metrics_file_is_plotted_checked_or_refused(records, data, extra):
    rows = data.draw(damaged({"records": records})).get("records")
    lines = [json.dumps(r) for r in (rows if isinstance(rows, list) else [rows])] + extra
    with sandbox() as root:
        (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        try:
            check_metrics(read_metrics(root / "metrics.jsonl"))
            readable = True
        except ValueError as error:
            assert "\n" not in str(error)
            readable = False
        code = run_checked(plot_meta.main, [root / "metrics.jsonl", "--output", root / "c.png"],
                           root, [root / "c.png"])
        assert (code == 0) == readable == (root / "c.png").exists()
        code = run_checked(plot_search.main, ["--runs", f"A={root / 'metrics.jsonl'}", "--output_dir",
                                              root / "out"], root, [root / "out"])
        assert code == 2 or readable


# ------------------------------------------------------------ DomainBed records, manifests


@pytest.fixture(scope="module")
def fixture_record() -> Dict[str, Any]:
    """A record of a real DomainBed run (the committed single-source sweep)."""
    results = next(FIXTURE.glob("*/results.jsonl"))
    return json.loads(results.read_text().splitlines()[0])


@MANY
@given(data=st.data())
def test_a_damaged_domainbed_record_is_checked_or_named(fixture_record, data):
    record = data.draw(damaged(fixture_record) | JSON)
    problem = record_problem(record)
    if problem is not None:
        assert isinstance(problem, str) and "\n" not in problem
        return
    n = sum(1 for k in record if k.startswith("env") and k.endswith("_out_acc"))
    assert type(record["step"]) is int and record["step"] >= 0 and n >= 2
    assert all(0 <= record[f"env{e}_{s}_acc"] <= 1 for e in range(n) for s in ("in", "out"))
    assert all(type(e) is int and 0 <= e < n for e in record["args"]["test_envs"])


@MANY
@given(data=st.data())
def test_a_damaged_manifest_is_read_checked_or_named(data):
    manifest = json.loads((FIXTURE / MANIFEST_NAME).read_text())
    with sandbox() as root:
        content = data.draw(damaged(manifest) | JSON)
        (root / MANIFEST_NAME).write_text(json.dumps(content))
        damaged_entries: List[str] = []
        for job in read_manifest(root, damaged_entries):
            assert 0 <= job.key.source < job.n_envs and "/" not in job.folder
        assert all("\n" not in line for line in damaged_entries)


@SOME
@given(lines=st.lists(JSON.map(json.dumps) | st.text(max_size=12), min_size=1, max_size=3),
       manifest=JSON)
def test_reports_over_a_sweep_with_damaged_files(lines, manifest):
    with sandbox() as root:
        sweep = root / "sweep"
        shutil.copytree(FIXTURE, sweep)
        results = next(sweep.glob("*/results.jsonl"))
        results.write_text(results.read_text() + "\n".join(lines) + "\n")
        (sweep / MANIFEST_NAME).write_text(json.dumps(manifest))
        run_checked(collect_single_source.main, ["--input_dir", sweep, "--output", root / "t.md"],
                    root, [root / "t.md"])
        run_checked(significance.main, ["--single_source_dir", sweep, "--output_dir", root / "sig"],
                    root, [root / "sig"])


# ------------------------------------------------------------------------- command lines


def _fuzzed(base: List[str], flags: Sequence[str]) -> st.SearchStrategy:
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


def test_every_command_is_fuzzed():
    scripts = Path(meta_train.__file__).parent
    assert {p.stem for p in scripts.glob("*.py") if not p.stem.startswith("_")} == {
        *COMMANDS, "plot_meta", "plot_search"}


NEEDS_DOMAINBED = {"in_vs_cross", "loss_landscape", "patch", "single_source_sweep", "target_entropy"}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - NEEDS_DOMAINBED))
def test_the_fuzzed_command_lines_run_as_given(name):
    """The fuzz below starts from command lines that run (those needing DomainBed are refused
    without it, as they should be), so that what it refuses, its flag values made refused."""
    main, base, _ = COMMANDS[name]
    output = OUTPUT_FLAG.get(name, "--output_dir")
    with sandbox() as root:
        out = [output, root / "out"] if output else []
        assert run_checked(main, [*base, *out], root, [root / "out"]) == 0
        if name in RUN_KINDS:
            check_run_outputs(root / "out", RUN_KINDS[name])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_random_flag_values_never_give_a_traceback_nor_touch_other_files(name):
    main, base, flags = COMMANDS[name]
    output = OUTPUT_FLAG.get(name, "--output_dir")

    @SOME
    @given(argv=_fuzzed(base, flags))
    def check(argv):
        with sandbox() as root:
            (root / "mine.txt").write_text("keep")
            out = [output, root / "out"] if output else []
            named = [root / v for f, v in zip(argv, argv[1:]) if f in ("--output", "--output_dir")]
            new = [path for path in named if not os.path.lexists(path)]  # mine.txt is not
            if run_checked(main, [*argv, *out], root, [root / "out", *new]) == 0:
                if name in RUN_KINDS:
                    check_run_outputs(root / "out", RUN_KINDS[name])
                for folder in (path for path in [root / "out", *new] if path.is_dir()):
                    check_json_outputs(folder)

    check()


FIGURE_OUTPUTS = {"fig": False, "fig.xyz": False, "mine.png": "overwrite", "sub/fig.pdf": True,
                  "mine.txt/fig.png": False, "sub": False, "fig.svg": True}  # written?


@pytest.mark.parametrize("output,overwrite", [(output, overwrite) for output in FIGURE_OUTPUTS
                                              for overwrite in (False, True)
                                              if not overwrite or FIGURE_OUTPUTS[output] is not True])
def test_plot_meta_writes_only_a_figure_it_may(runs, output, overwrite):
    """Every case (few enough to try them all): a figure of a new name, a name matplotlib cannot
    write, a file of the user's, a parent that is a file, a folder."""
    with sandbox() as root:
        (root / "mine.txt").write_text("keep")
        (root / "mine.png").write_bytes(b"not a figure of ours")
        (root / "sub").mkdir()
        argv = [runs / "meta" / "metrics.jsonl", "--output", root / output]
        new = not (root / output).exists()
        made = root / Path(output).parts[0]  # the figure, or the folder made for it
        code = run_checked(plot_meta.main, argv + (["--overwrite"] if overwrite else []), root,
                           [made] if new or overwrite else [])
        written = FIGURE_OUTPUTS[output] is True or FIGURE_OUTPUTS[output] == "overwrite" and overwrite
        assert code == (0 if written else 2)
        if written:
            assert (root / output).read_bytes()[:4] in (b"\x89PNG", b"%PDF", b"<?xm")


# ------------------------------------------------------------------- trust boundaries


class Hostile:
    """An object whose unpickling runs code: it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _hostile_bytes(marker: Path, how: str, checkpoint: Dict[str, Any]) -> bytes:
    """A file that runs code when unpickled: a bare pickle, or a torch file holding the object
    alone or in place of a part of a real checkpoint."""
    if how == "pickle":
        return pickle.dumps(Hostile(marker))
    buffer = io.BytesIO()
    torch.save(Hostile(marker) if how == "torch" else {**checkpoint, how: Hostile(marker)}, buffer)
    return buffer.getvalue()


READERS = {"metrics.jsonl": lambda path, out: (plot_meta.main, [path, "--output", out / "f.png"]),
           "loss.json": lambda path, out: (loss_shapes.main, ["--losses", path, "--output_dir", out])}


@CHECKPOINTS
@given(name=st.sampled_from(sorted(RESUMES)), how=st.sampled_from(["pickle", "torch", "format",
                                                                   "metrics", "provenance"]),
       file=st.sampled_from(["checkpoint.pt", "metrics.jsonl", "loss.json"]))
def test_a_hostile_pickle_in_any_file_of_a_run_folder_is_refused_unread(runs, name, how, file):
    """Whatever file of whatever run folder holds a pickle that would run code, no command runs
    it: a resume refuses it (one line naming a checkpoint) or never reads it (the views are
    rewritten from the checkpoint), and the readers of the views refuse it in one line."""
    kind, main, argv = RESUMES[name]
    with sandbox() as root:
        folder, marker = root / name, root / "marker"
        shutil.copytree(runs / name, folder)
        if not (folder / file).exists():
            return
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
        (folder / file).write_bytes(_hostile_bytes(marker, how, checkpoint))
        code, err = call(main, [*argv, "--output_dir", folder])
        check_boundary(code, err)
        assert not marker.exists(), err
        if file == "checkpoint.pt":
            assert code == 2 and str(folder / file) in err.splitlines()[-1], err
            assert "could run code" in err or "not a readable torch file" in err, err
        elif file in READERS and code == 0:  # the resume rewrote the view; now damage it again
            (folder / file).write_bytes(_hostile_bytes(marker, how, checkpoint))
            reader, args = READERS[file](folder / file, root / "read")
            code, err = call(reader, args)
            check_boundary(code, err)
            assert code == 2 and str(folder / file) in err, err
            assert not marker.exists(), err


def test_a_cma_checkpoint_of_an_earlier_version_with_a_pickled_strategy_is_refused(runs):
    """Checkpoints of earlier versions that hold only safe types resume (the properties above);
    a CMA-ES checkpoint that stored its strategy as a pickle is refused, the pickle unread."""
    with sandbox() as root:
        folder, marker = root / "cma", root / "marker"
        shutil.copytree(runs / "cma", folder)
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
        search = {k: v for k, v in checkpoint["search"].items() if k != "history"}
        torch.save({**checkpoint, "search": {**search, "es": pickle.dumps(Hostile(marker))}},
                   folder / "checkpoint.pt")
        code, err = call(cma_search.main, [*RESUMES["cma"][2], "--output_dir", folder])
        check_boundary(code, err)
        assert code == 2 and "as a pickle" in err and "--overwrite" in err, err
        assert not marker.exists()


def test_a_cma_checkpoint_holds_numbers_and_replays_to_the_same_strategy(runs):
    checkpoint = torch.load(runs / "cma" / "checkpoint.pt", weights_only=True)
    assert "es" not in checkpoint["search"]
    history = checkpoint["search"]["history"]
    assert len(history) == checkpoint["done"] and all(
        len(g["candidates"]) == len(g["fitnesses"]) == 3 for g in history)


@SOME
@given(flag=st.sampled_from([(evaluate_loss.main, EVALUATION, "--seeds", ["0", "1"]),
                             (evaluate_loss.main, EVALUATION, "--losses", ["CE", "ITL"]),
                             (evaluate_loss.main, EVALUATION, "--inner_steps", ["2", "3"]),
                             (significance.main, ["--single_source_dir", FIXTURE], "--algorithms",
                              ["ERM", "ITL"]),
                             (collect_single_source.main, ["--input_dir", FIXTURE], "--datasets",
                              ["Debug28", "Debug224"])]),
       repeat=st.integers(0, 1), at=st.integers(0, 2))
def test_a_repeated_value_of_a_set_like_flag_is_refused(flag, repeat, at):
    """A list flag whose values are a set refuses a repeated value in one line naming it, and
    leaves the disk as it found it."""
    main, base, name, values = flag
    given_values = list(values)
    given_values.insert(min(at, len(given_values)), values[repeat])
    with sandbox() as root:
        argv = [*base, name, *given_values, "--output_dir", root / "out"]
        assert run_checked(main, argv, root, []) == 2
        code, err = call(main, argv)
        assert re.search(f"{name} gives '?{re.escape(values[repeat])}'? twice", err), err


@SOME
@given(stem=st.sampled_from(["../x", "..", ".", "a/b", "/tmp/x", "sub/../x", "a\\b", ""])
       | st.text(alphabet="ab./\\", min_size=1, max_size=6).filter(
           lambda t: "/" in t or "\\" in t or t in (".", "..")))
def test_an_output_name_is_a_name_not_a_path(records, stem):
    with sandbox() as root:
        (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        out = root / "out" / "deeper"
        argv = ["--runs", f"A={root / 'm.jsonl'}", "--output_dir", out, "--stem", stem]
        assert run_checked(plot_search.main, argv, root, []) == 2


MIXES = {"seed": lambda r: {**r, "args": {**r["args"], "seed": r["args"].get("seed", 0) + 1}},
         "hparams": lambda r: {**r, "hparams": {**r["hparams"], "lr": 0.5}},
         "steps": lambda r: {**r, "args": {**r["args"], "steps": r["args"].get("steps", 0) + 7}},
         "restart": lambda r: r}


@SOME
@given(mix=st.sampled_from(sorted(MIXES)), count=st.integers(1, 3), data=st.data())
def test_a_results_file_that_mixes_runs_is_set_aside_naming_it(mix, count, data):
    """Records of a second run appended to a job's results.jsonl (another seed, hparams, step
    count, or the same run started again) never count as the job's: every reader sets the
    job aside, naming the file; the other jobs are read as before."""
    with sandbox() as root:
        sweep = root / "sweep"
        shutil.copytree(FIXTURE, sweep)
        jobs = sorted(p for p in sweep.iterdir() if (p / "results.jsonl").exists())
        job = data.draw(st.sampled_from(jobs))
        results = job / "results.jsonl"
        lines = results.read_text().splitlines()
        appended = [json.dumps(MIXES[mix](json.loads(line))) for line in lines[:count]]
        results.write_text("\n".join(lines + appended) + "\n")
        runs_read = {run.folder: run for run in load_runs(sweep)}
        assert runs_read[job.name].records == [] and str(results) in runs_read[job.name].error
        assert all(run.records for name, run in runs_read.items() if name != job.name)
        code, err = call(significance.main, ["--single_source_dir", sweep, "--output_dir",
                                             root / "sig"])
        check_boundary(code, err)


def test_one_run_of_a_results_file_is_read_whole():
    runs_read = load_runs(FIXTURE)
    assert runs_read and all(run.error is None and run.records for run in runs_read)
    assert mixed_runs(runs_read[0].records) is None


@SOME
@given(dataset=st.sampled_from(["synthetic", "planted"]),
       parameters=st.sampled_from([[0.0] * 12, [math.inf] + [0.0] * 11]))
def test_a_loss_check_holds_for_every_data_set(dataset, parameters):
    """A loss that cannot be minimised is refused, on any data set (built in or not in any
    table), with the classes of the data loaded."""
    with sandbox() as root:
        (root / "flat.json").write_text(json.dumps(
            {"format": "domainbed-itl-loss", "version": 1, "family": "taylor", "order": 4,
             "parameters": parameters, "provenance": {}}, allow_nan=True))
        argv = ["meta", "--losses", "CE", root / "flat.json", "--seeds", "0", "--dataset",
                dataset, "--per_domain_cap", "20", *INNER, "--output_dir", root / "out"]
        assert run_checked(evaluate_loss.main, argv, root, []) == 2


def _fill(folder: Path) -> None:
    """Write files into `folder` until its file system is full."""
    with contextlib.suppress(OSError):
        for i in range(10 ** 4):
            (folder / f"filler{i}").write_bytes(b"x" * 4096)


@contextlib.contextmanager
def full_disk(root: Path) -> Iterator[Path]:
    """A folder on a full file system: a small tmpfs where this machine may mount one (as root),
    else a writer patched to fail as a full disk does."""
    disk = root / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    try:
        if mounted:
            (disk / "full").mkdir()
            _fill(disk / "full")
            yield disk
        else:
            real = os.fdopen

            class Full:
                def __init__(self, *args, **kwargs):
                    self.file = real(*args, **kwargs)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    self.file.close()

                def write(self, data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(atomic.os, "fdopen", Full)
                yield disk
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("command", ["meta_train", "evaluate_loss"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_made(command):
    main, base, _ = COMMANDS[command]
    with sandbox() as root, full_disk(root) as disk:
        before = sorted(p.name for p in disk.iterdir())
        code, err = call(main, [*base, "--output_dir", disk / "run" / "out"])
        check_boundary(code, err)
        assert code == 2 and "No space left on device writing" in err and str(disk / "run") in err, err
        assert sorted(p.name for p in disk.iterdir()) == before  # no folder, lock or temp file
        code, err = call(main, [*base, "--output_dir", disk / "run" / "out", "--resume"])
        assert code == 2, err


def test_sigterm_stops_a_command_as_ctrl_c_does_and_it_resumes(tmp_path):
    """SIGTERM mid-run: one line, exit 143, and the run resumes to the end."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "domainbed_itl.scripts.meta_train", *[str(a) for a in META[:-1]],
            "200", "--output_dir", str(out)]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.rstrip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    done = load_checkpoint(out / "checkpoint.pt", META_RUN)["done"]
    code, err = call(meta_train.main, ["--resume", "--outer_steps", str(done + 1), "--no_progress",
                                       "--output_dir", out])
    assert code == 0, err
    assert len(read_metrics(out / "metrics.jsonl")) == done + 1


def test_the_hostile_pickle_runs_code_when_read_unchecked(tmp_path):
    """The hostile files above are hostile: an unchecked read runs their code."""
    marker = tmp_path / "marker"
    pickle.loads(_hostile_bytes(marker, "pickle", {}))
    assert marker.exists()


@pytest.mark.skipif(not os.environ.get("DOMAINBED_ROOT"), reason="needs DOMAINBED_ROOT (a DomainBed "
                    "checkout)")
@pytest.mark.parametrize("how", ["pickle", "torch", "model_dict"])
def test_a_hostile_domainbed_model_is_refused_unread(tmp_path, how):
    """DomainBed's model.pkl is a third party's pickle: read with weights_only, a hostile one is
    refused in one line naming it, its code never run."""
    from domainbed_itl.bridge.trained_models import RunError, load_model

    marker, path = tmp_path / "marker", tmp_path / "model.pkl"
    path.write_bytes(_hostile_bytes(marker, how, {"args": {"algorithm": "ERM"}}))
    with pytest.raises(RunError, match=f"{re.escape(str(path))} holds more than tensors") as error:
        load_model(path)
    assert "\n" not in str(error.value) and not marker.exists()


@SOME
@given(added=st.sampled_from([["--seeds", "0", "1"], ["--losses", "CE", "ITL", "SCE"],
                              ["--seeds", "1"]]))
def test_a_finished_evaluation_continues_with_added_seeds_or_losses(runs, added):
    """As docs/files.md says: a finished evaluation run again with more seeds or losses computes
    only the new units and replaces its reports; run again as it was, it is refused."""
    with sandbox() as root:
        folder = root / "evaluation"
        shutil.copytree(runs / "evaluation", folder)
        assert call(evaluate_loss.main, [*EVALUATION, "--output_dir", folder])[0] == 0
        kept = {(u["unit"], u["loss"]): u["records"] for u in load_checkpoint(
            folder / "checkpoint.pt", EVALUATION_RUN)["units"]}
        code, err = call(evaluate_loss.main, [*EVALUATION, "--output_dir", folder])
        assert code == 2 and "already holds an evaluation" in err, err
        code, err = call(evaluate_loss.main, [*EVALUATION, *added, "--output_dir", folder])
        assert code == 0, err
        units = {(u["unit"], u["loss"]): u["records"] for u in load_checkpoint(
            folder / "checkpoint.pt", EVALUATION_RUN)["units"]}
        assert len(units) > len(kept) and all(units[key] == kept[key] for key in kept)
        report = json.loads((folder / "evaluation.json").read_text())
        assert {(r["unit"], r["loss"]) for r in report["records"]} <= set(units)


BAD_PLUGINS = {"missing": None, "raising": "raise RuntimeError('broken plugin')\n",
               "syntax": "def (\n"}


@pytest.mark.parametrize("bad", sorted(BAD_PLUGINS))
def test_a_bad_family_plugin_fails_where_a_family_is_used_and_nowhere_else(tmp_path, bad):
    """A module named in DOMAINBED_ITL_FAMILIES that is missing, raises or does not parse:
    the package imports and the commands that use no family of a plugin work; the first look-up
    of a family not built in is one line naming the variable and the module."""
    from domainbed_itl.losses.families import PLUGINS_ENV

    if BAD_PLUGINS[bad] is not None:
        (tmp_path / "bad_plugin.py").write_text(BAD_PLUGINS[bad])
    env = {**os.environ, PLUGINS_ENV: "bad_plugin",
           "PYTHONPATH": os.pathsep.join([str(Path(meta_train.__file__).parents[2]), str(tmp_path)])}
    shapes = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses",
                             "CE", "ITL", "--points", "5", "--output_dir", str(tmp_path / "shapes")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert shapes.returncode == 0, shapes.stderr
    (tmp_path / "mine.json").write_text(json.dumps({"format": "domainbed-itl-loss", "version": 1,
                                                    "family": "user_family", "order": None,
                                                    "parameters": [0.5]}))
    used = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses",
                           str(tmp_path / "mine.json"), "--output_dir", str(tmp_path / "mine")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert used.returncode == 2 and "Traceback" not in used.stderr, used.stderr
    line = used.stderr.strip().splitlines()[-1]
    assert f"{PLUGINS_ENV} names the module 'bad_plugin'" in line and len(
        used.stderr.strip().splitlines()) == 1, used.stderr
    assert not (tmp_path / "mine").exists()


class BroadcastGradient(torch.nn.Module):
    """A user's loss whose closed-form gradient is a broadcast (read-only, stride 0) tensor."""

    def forward(self, logits, target, reduction="mean"):
        values = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return values if reduction == "none" else values.mean()

    def loss_and_grad(self, logits, target):
        values = self.forward(logits, target, "none")
        return values, torch.full((1, logits.shape[1]), 0.01).expand_as(logits)


@SOME
@given(batched=st.booleans(), optimizer=st.sampled_from(["sgd", "momentum", "adam"]))
def test_the_inner_loop_never_writes_into_a_losss_gradient(batched, optimizer):
    from domainbed_itl.meta import inner

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    params = inner.init_params(inner.mlp(3, (4,), 2), [0, 1], torch.device("cpu"))
    opt = inner.InnerOptimizer(optimizer, lr=0.1)
    state = opt.init_state(params)
    before = {k: v.clone() for k, v in params.items()}
    losses = inner.train(params, BroadcastGradient(), opt, state, x, y,
                         torch.randint(0, 12, (2, 3, 4)), batched=batched)
    assert losses.shape == (2, 3) and bool(torch.isfinite(losses).all())
    assert any(not torch.equal(before[k], params[k]) for k in params)


def _endless(path: Path, kind: str) -> None:
    """Make `path` a file that a plain read would never finish or that is too large to read:
    a named pipe, a link to /dev/zero, or a sparse file of `kind` MiB."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(int(kind) * 2 ** 20)


@SOME
@given(kind=st.sampled_from(["fifo", "zero", "17", "300"]))
def test_an_endless_or_huge_input_file_is_refused_before_it_is_read(records, kind):
    """Every input file is checked before it is read: a loss file, a metrics file or a
    DomainBed record set that is a pipe, a device or too large is refused in one line naming it."""
    with sandbox() as root:
        loss, metrics = root / "loss.json", root / "metrics.jsonl"
        _endless(loss, kind)
        _endless(metrics, kind if kind != "17" else "300")
        with pytest.raises(LossFileError, match=re.escape(str(loss))):
            load_loss(loss)
        code, err = call(loss_shapes.main, ["--losses", loss, "--output_dir", root / "out"])
        check_boundary(code, err)
        assert code == 2 and str(loss) in err
        code, err = call(plot_meta.main, [metrics, "--output", root / "f.png"])
        check_boundary(code, err)
        assert code == 2 and str(metrics) in err
        sweep = root / "sweep"
        shutil.copytree(FIXTURE, sweep)
        results = next(sweep.glob("*/results.jsonl"))
        results.unlink()
        _endless(results, kind if kind != "17" else "300")
        job = {run.folder: run for run in load_runs(sweep)}[results.parent.name]
        assert job.records == [] and str(results) in job.error


def test_a_huge_checkpoint_is_refused_unread(runs):
    with sandbox() as root:
        folder = root / "meta"
        shutil.copytree(runs / "meta", folder)
        _endless(folder / "checkpoint.pt", str(17 * 1024))
        code, err = call(meta_train.main, [*RESUMES["meta"][2], "--output_dir", folder])
        check_boundary(code, err)
        assert code == 2 and str(folder / "checkpoint.pt") in err and "MiB" in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine mounts no tmpfs")
    try:
        main, base, _ = COMMANDS["meta_train"]
        code, err = call(main, [*base, "--output_dir", disk / "run"])
        check_boundary(code, err)
        assert code == 2 and "Read-only file system" in err and str(disk / "run") in err, err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("how", ["pickle", "torch", "units"])
def test_a_hostile_pickle_in_a_grid_search_folder_is_refused_unread(how):
    main, base, _ = COMMANDS["grid_search"]
    with sandbox() as root:
        folder, marker = root / "grid", root / "marker"
        code, err = call(main, [*base, "--output_dir", folder])
        assert code == 0, err
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
        (folder / "checkpoint.pt").write_bytes(_hostile_bytes(marker, how, checkpoint))
        for name in [p.name for p in folder.iterdir() if p.suffix in (".md", ".json", ".csv")]:
            (folder / name).unlink()  # so that the command continues from the checkpoint
        code, err = call(main, [*base, "--output_dir", folder])
        check_boundary(code, err)
        assert code == 2 and str(folder / "checkpoint.pt") in err and not marker.exists(), err
