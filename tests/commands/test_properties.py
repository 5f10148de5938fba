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
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS, LossHparamError, check_loss_hparams
from domainbed_itl.files.runfolder import load_checkpoint, read_metrics
from domainbed_itl.files.sweepfolder import MANIFEST_NAME, read_manifest, record_problem
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
