"""The catalogue: every command, driven with bad input, exits non-zero with one error line that
names the bad value, and no traceback.

The commands run in process (their `main`), so that an exception escaping one fails the test as
a traceback would; no DomainBed is needed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from domainbed_itl.losses import cross_entropy_taylor_init

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "single_source_debug28"
SYNTHETIC = ["--dataset", "synthetic", "--per_domain_cap", "48", "--inner_steps", "8", "--hidden", "8",
             "--hvp_batch", "32", "--outer_steps", "1", "--no_progress"]
SWEEP = ["launch", "--command_launcher", "local", "--skip_confirmation"]
CMA = ["--dataset", "synthetic", "--per_domain_cap", "48", "--inner_steps", "8", "--hidden", "8",
       "--generations", "1", "--no_progress"]
FOCAL_DEFINITION = """title = "t"
reproduces = "r"
runner = "domainbed_sweep"
[paper.args]
datasets = ["PACS"]
algorithms = ["ERM_Focal"]
[paper.cost]
unit = "GPU-hours"
per_job = 1.0
basis = "b"
[reduced.args]
datasets = ["ColoredMNIST"]
algorithms = ["ERM_Focal"]
hparams = { focal_gamma = -0.5 }
[reduced.cost]
unit = "wall-minutes"
per_job = 1.0
basis = "b"
"""


def _files(tmp_path: Path) -> dict:
    """Placeholders of the catalogue: {name} in an argument becomes one of these paths."""
    absurd = tmp_path / "absurd.json"  # finite parameters whose loss overflows
    absurd.write_text(json.dumps({"family": "taylor", "order": 4, "parameters": [1e30] * 12}))
    upside = tmp_path / "upside_down.json"  # cross-entropy's Taylor expansion, negated: maximised
    upside.write_text(json.dumps({"family": "taylor", "order": 4, "parameters": [
        v if i < 2 else -v for i, v in enumerate(cross_entropy_taylor_init(4, 10))]}))
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "focal.toml").write_text(FOCAL_DEFINITION)
    (tmp_path / "exists.txt").write_text("keep me")
    return {"out": tmp_path / "out", "missing": tmp_path / "no_such_thing", "absurd": absurd,
            "upside": upside, "sweeps": tmp_path / "sweeps", "exists": tmp_path / "exists.txt",
            "fixture": FIXTURE, "data": tmp_path}


# (command, arguments, the bad value the error line must name); {name}: see _files, {locked}: a
# folder whose lock another process holds.
CATALOGUE = [
    ("meta_train", [*SYNTHETIC, "--output_dir", "{out}", "--inner_lr", "-1"], "'-1'"),
    ("meta_train", [*SYNTHETIC, "--output_dir", "{out}", "--init", "{missing}"], "{missing}"),
    ("meta_train", [*SYNTHETIC, "--output_dir", "{out}", "--device", "gpu0"], "gpu0"),
    ("meta_train", [*SYNTHETIC, "--output_dir", "{out}", "--resume", "--overwrite"], "--overwrite"),
    ("meta_train", ["--dataset", "RotatedMNIST", "--data_dir", "{missing}", "--output_dir", "{out}"],
     "{missing}"),
    ("meta_train", [*SYNTHETIC, "--output_dir", "{locked}"], "{locked}"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ITL", "--hparams", '{"itl_loss": "{missing}"}',
                             "--data_dir", "{data}", "--output_dir", "{out}"], "itl_loss='{missing}'"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ITL", "--datasets", "RotatedMNIST", "--hparams",
                             '{"itl_loss": "{absurd}"}', "--data_dir", "{data}", "--output_dir",
                             "{out}"], "itl_loss='{absurd}' is not finite"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "RSC_ITL", "--datasets", "PACS", "--hparams",
                             '{"itl_loss": "{upside}"}', "--data_dir", "{data}", "--output_dir",
                             "{out}"], "itl_loss='{upside}' would be maximised"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ERM_Focal", "--hparams", '{"focal_gamma": -1}',
                             "--data_dir", "{data}", "--output_dir", "{out}"], "focal_gamma=-1"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ERM_SCE", "--hparams", '{"sce_alpha": -0.1}',
                             "--data_dir", "{data}", "--output_dir", "{out}"], "alpha=-0.1"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ERM_GCE", "--hparams", '{"gce_q": 1.5}',
                             "--data_dir", "{data}", "--output_dir", "{out}"], "gce_q=1.5"),
    ("single_source_sweep", [*SWEEP, "--hparams", "[8]", "--data_dir", "{data}", "--output_dir",
                             "{out}"], "'[8]'"),
    ("single_source_sweep", [*SWEEP, "--algorithms", "ERM", "--domainbed_root", "{missing}",
                             "--data_dir", "{data}", "--output_dir", "{out}"], "{missing}"),
    ("collect_single_source", ["--input_dir", "{missing}"], "{missing}"),
    ("collect_single_source", ["--input_dir", "{fixture}", "--algorithms", "SagNet"], "'SagNet'"),
    ("collect_single_source", ["--input_dir", "{fixture}", "--output", "{exists}"], "{exists}"),
    ("significance", ["--single_source_dir", "{missing}", "--output_dir", "{out}"], "{missing}"),
    ("significance", ["--single_source_dir", "{fixture}", "--output_dir", "{out}", "--alpha", "2"],
     "2.0"),
    ("significance", ["--single_source_dir", "{fixture}", "--output_dir", "{locked}"], "{locked}"),
    ("evaluate_loss", ["meta", "--dataset", "synthetic", "--losses", "CE", "{missing}", "--output_dir",
                       "{out}"], "{missing}"),
    ("evaluate_loss", ["meta", "--dataset", "RotatedMNIST", "--losses", "CE", "{upside}",
                       "--output_dir", "{out}"], "{upside}' would be maximised"),
    ("evaluate_loss", ["meta", "--dataset", "synthetic", "--losses", "CE", "ITL", "--reference",
                       "Focal", "--output_dir", "{out}"], "'Focal'"),
    ("evaluate_loss", ["meta", "--dataset", "synthetic", "--per_domain_cap", "8", "--losses", "CE",
                       "--output_dir", "{locked}"], "{locked}"),
    ("grid_search", ["--dataset", "synthetic", "--grid", "poly1=-2", "--output_dir", "{out}"],
     "epsilon1=-2.0"),
    ("grid_search", ["--dataset", "synthetic", "--grid", "taylor4=1", "--output_dir", "{out}"],
     "'taylor4=1'"),
    ("grid_search", ["--dataset", "synthetic", "--grid", "focal=1", "--losses", "CE", "{missing}",
                     "--output_dir", "{out}"], "{missing}"),
    ("grid_search", ["--dataset", "synthetic", "--per_domain_cap", "8", "--grid", "focal=1",
                     "--output_dir", "{locked}"], "{locked}"),
    ("paper_sweep", ["show", "table9_nothing"], "'table9_nothing'"),
    ("paper_sweep", ["show", "table2_multi_source", "--command_launcher", "slurm"], "'slurm'"),
    ("paper_sweep", ["--sweeps_dir", "{sweeps}", "run", "focal", "--reduced", "--data_dir", "{data}",
                     "--output_dir", "{out}"], "focal_gamma=-0.5"),
    ("quickstart", ["--workdir", "{out}", "--hparams", '{"ls_epsilon": 1}', "--algorithms", "ERM_LS",
                    "--dry_run"], "ls_epsilon=1"),
    ("quickstart", ["--workdir", "{out}", "--steps", "0", "--dry_run"], "got 0"),
    ("patch", ["apply", "--domainbed_root", "{missing}"], "{missing}"),
    ("plot_meta", ["{missing}"], "{missing}"),
    ("cma_search", [*CMA, "--output_dir", "{out}", "--popsize", "1"], "'1'"),
    ("cma_search", [*CMA, "--output_dir", "{out}", "--init", "{missing}"], "{missing}"),
    ("cma_search", ["--dataset", "RotatedMNIST", "--data_dir", "{missing}", "--output_dir", "{out}"],
     "{missing}"),
    ("cma_search", [*CMA, "--output_dir", "{locked}"], "{locked}"),
    ("plot_search", ["--runs", "A={missing}", "--output_dir", "{out}"], "{missing}"),
    ("plot_search", ["--runs", "{missing}", "--output_dir", "{out}"], "{missing}"),
    ("loss_shapes", ["--losses", "CE", "{missing}", "--output_dir", "{out}"], "{missing}"),
    ("target_entropy", ["{missing}", "--output_dir", "{out}"], "{missing}"),
    ("loss_landscape", ["{missing}", "--output_dir", "{out}"], "{missing}"),
    ("in_vs_cross", ["{missing}", "--output_dir", "{out}"], "{missing}"),
]


@pytest.mark.parametrize("command, argv, bad", CATALOGUE,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CATALOGUE)])
def test_bad_input_gets_one_line_naming_it(command, argv, bad, tmp_path, capsys, request):
    names = {k: str(v) for k, v in _files(tmp_path).items()}
    if any("{locked}" in a for a in argv):
        names["locked"] = str(request.getfixturevalue("locked_folder"))
    argv = [_fill(a, names) for a in argv]
    bad = _fill(bad, names)
    main = importlib.import_module(f"domainbed_itl.scripts.{command}").main
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code not in (0, None), out + err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert bad in errors[0], errors[0]
    assert (tmp_path / "exists.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()  # nothing was started


def _fill(text: str, names: dict) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def test_every_command_is_in_the_catalogue():
    """A new command joins the catalogue: it too must answer bad input with one error line."""
    scripts = Path(__file__).resolve().parents[2] / "domainbed_itl" / "scripts"
    commands = {p.stem for p in scripts.glob("*.py") if not p.stem.startswith("_")}
    assert commands == {command for command, _, _ in CATALOGUE}
