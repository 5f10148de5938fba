"""Property-based tests (hypothesis) of damaged run folders: checkpoints, metrics and views of a
finished meta-training run, CMA-ES search and loss evaluation (made once for this module), as
tests/commands/test_properties.py states the properties."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from property_harness import (CHECKPOINTS, CMA, EVALUATION, FIXTURE, Hostile, JSON, META, RESUMES,
                              SCALE, SOME, VALUES, call, check_boundary, check_run_outputs, damaged,
                              hostile_bytes, run_checked, sandbox)

from domainbed_itl.files.runfolder import load_checkpoint, read_metrics
from domainbed_itl.files.sweepfolder import load_runs
from domainbed_itl.losses import LossFileError, load_loss
from domainbed_itl.meta.evaluate import EVALUATION_RUN
from domainbed_itl.scripts import (cma_search, evaluate_loss, loss_shapes, meta_train,
                                   plot_meta, plot_search)


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


@pytest.mark.parametrize("name", ["meta", "cma"])
def test_a_checkpoint_record_holding_a_tensor_is_refused_in_one_line(runs, name):
    """Found by the property above: a record's value replaced by a tensor passed the record's
    float check, and the resume then failed writing metrics.jsonl with a traceback."""
    def damage(checkpoint):
        checkpoint["metrics"][0]["outer_heldout_acc"] = torch.tensor(0.5)
        return checkpoint

    assert _resume_damaged(runs, name, damage) == 2  # refused (run_checked: one line, no traceback)


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
        (folder / file).write_bytes(hostile_bytes(marker, how, checkpoint))
        code, err = call(main, [*argv, "--output_dir", folder])
        check_boundary(code, err)
        assert not marker.exists(), err
        if file == "checkpoint.pt":
            assert code == 2 and str(folder / file) in err.splitlines()[-1], err
            assert "could run code" in err or "not a readable torch file" in err, err
        elif file in READERS and code == 0:  # the resume rewrote the view; now damage it again
            (folder / file).write_bytes(hostile_bytes(marker, how, checkpoint))
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
@given(stem=st.sampled_from(["../x", "..", ".", "a/b", "/tmp/x", "sub/../x", "a\\b", ""])
       | st.text(alphabet="ab./\\", min_size=1, max_size=6).filter(
           lambda t: "/" in t or "\\" in t or t in (".", "..")))
def test_an_output_name_is_a_name_not_a_path(records, stem):
    with sandbox() as root:
        (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        out = root / "out" / "deeper"
        argv = ["--runs", f"A={root / 'm.jsonl'}", "--output_dir", out, "--stem", stem]
        assert run_checked(plot_search.main, argv, root, []) == 2


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
