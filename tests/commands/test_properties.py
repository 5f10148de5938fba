"""Property-based tests (hypothesis) of every reader and every command line: loss files, DomainBed
records, sweep manifests and flag values here; damaged run folders in test_properties_runs.py,
the trust boundaries in test_properties_trust.py; their harness in tests/property_harness.py.

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
checkpoints are damaged are made once (test_properties_runs.py) and resumed with nothing left to train.
Numbers drawn for flags and damaged fields are small or absurd (beyond any memory), never in
between, so that an accepted value cannot start a long computation."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_harness import (COMMANDS, EVALUATION, FIXTURE, FLOATS, INTEGERS, JSON, MANY,
                              NEEDS_DOMAINBED, OUTPUT_FLAG, RUN_KINDS, SCALARS, SOME, VALID_LOSS,
                              call, check_json_outputs, check_loss_spec, check_run_outputs, damaged,
                              fuzzed, run_checked, sandbox)

from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS, LossHparamError, check_loss_hparams
from domainbed_itl.files.sweepfolder import MANIFEST_NAME, read_manifest, record_problem
from domainbed_itl.losses import LossFileError, TaylorLoss, get_family, load_loss
from domainbed_itl.scripts import (collect_single_source, evaluate_loss, loss_shapes, meta_train,
                                   significance)


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


def test_every_command_is_fuzzed():
    scripts = Path(meta_train.__file__).parent
    assert {p.stem for p in scripts.glob("*.py") if not p.stem.startswith("_")} == {
        *COMMANDS, "plot_meta", "plot_search"}


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
    @given(argv=fuzzed(base, flags))
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
