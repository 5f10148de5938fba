"""Loss files: round trip, provenance, and one clear error per kind of bad file."""

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch

from domainbed_itl import __version__
from domainbed_itl.losses import (ITL_PARAMETERS, LOSS_PRESETS, LossFileError, LossSpec, TaylorLoss,
                                  load_loss, resolve_loss, save_loss)

REPO = Path(__file__).resolve().parents[2]


def test_round_trip(tmp_path):
    spec = LossSpec("taylor", 3, [0.1 * i for i in range(8)],
                    {"meta_train_dataset": "RotatedMNIST", "steps": 5, "seed": 1})
    path = save_loss(tmp_path / "loss.json", spec)
    loaded = load_loss(path)
    assert loaded.parameters == spec.parameters and loaded.order == 3
    assert loaded.provenance == {"package_version": __version__, **spec.provenance}
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(loaded.module()(logits, target),
                               TaylorLoss(spec.parameters, 3)(logits, target))


def test_save_never_overwrites_by_accident(tmp_path):
    path = save_loss(tmp_path / "loss.json", LOSS_PRESETS["ITL"])
    before = path.read_text()
    with pytest.raises(FileExistsError):
        save_loss(path, LossSpec("sce", None, [1.0, 2.0]))
    assert path.read_text() == before
    save_loss(path, LossSpec("sce", None, [1.0, 2.0]), overwrite=True)
    assert load_loss(path).family == "sce"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.json"]  # no temporary file left


def test_itl_preset_is_table_8():
    spec = resolve_loss("ITL")
    assert spec.family == "taylor" and spec.order == 4
    assert spec.parameters == list(ITL_PARAMETERS)
    assert spec.parameters[0] == -2.0193 and spec.parameters[-1] == 0.9975


def _write(tmp_path, data):
    path = tmp_path / "loss.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


GOOD = {"family": "taylor", "order": 4, "parameters": list(ITL_PARAMETERS)}


@pytest.mark.parametrize("data,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({**GOOD, "family": "neural"}, "unknown loss family 'neural'"),
    ({**GOOD, "order": 7}, r"order must be an integer in \[2, 5\], got 7"),
    ({**GOOD, "parameters": GOOD["parameters"][:11]}, "order 4 has 12 parameters, got 11"),
    ({**GOOD, "parameters": GOOD["parameters"][:11] + [math.nan]},
     r"parameters.11: input should be a finite number \(got nan\)"),
    ({**GOOD, "parameters": GOOD["parameters"][:11] + ["1.0"]},
     r"parameters.11: input should be a valid number \(got '1.0'\)"),
    ({**GOOD, "parameters": GOOD["parameters"][:11] + [True]},
     "parameters.11: input should be a valid number"),
    ({**GOOD, "order": True}, r"order: input should be a valid integer \(got True\)"),
    ({**GOOD, "order": 4.0}, r"order: input should be a valid integer \(got 4.0\)"),
    ({"family": "taylor", "order": 4}, r"lacks parameters"),
    ({**GOOD, "format": "something-else"}, "format: input should be 'domainbed-itl-loss'"),
    ({**GOOD, "version": 2}, r"format version 2 is not one this version of domainbed-itl reads \(1\)"),
    ({**GOOD, "version": "1"}, r"format version '1' is not one"),
    ({**GOOD, "paramters": [1.0]}, "paramters: not a field of this format"),
    ({**GOOD, "provenance": [1]}, "provenance: input should be a valid dictionary"),
    ({"family": "sce", "order": 2, "parameters": [0.1, 1.0]}, "takes no order"),
])
def test_bad_files_name_the_problem(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(LossFileError, match=message) as info:
        load_loss(path)
    assert str(path) in str(info.value)


def test_nan_written_by_json_is_rejected(tmp_path):
    path = _write(tmp_path, json.dumps({**GOOD, "parameters": [math.inf] * 12}))
    with pytest.raises(LossFileError, match="finite"):
        load_loss(path)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(LossFileError, match="cannot read loss file"):
        load_loss(tmp_path / "absent.json")
    with pytest.raises(LossFileError, match="neither a preset loss"):
        resolve_loss(str(tmp_path / "absent.json"))


def _loss_at(spec, p_true, classes=10):
    """The minimised loss of `spec` for predictions with p_true on class 0, the rest spread evenly."""
    probs = torch.full((len(p_true), classes), 0.0, dtype=torch.float64)
    probs[:, 0] = torch.tensor(p_true, dtype=torch.float64)
    probs[:, 1:] = ((1 - probs[:, 0]) / (classes - 1)).unsqueeze(1)
    logits = probs.log()
    return TaylorLoss(spec.parameters, spec.order).double()(logits, torch.zeros(len(p_true)).long(),
                                                            reduction="none")


def test_shipped_learned_loss_is_minimised_by_the_true_class_and_says_how_it_was_found():
    spec = resolve_loss("learned-RotatedMNIST")
    assert spec.family == "taylor" and spec.order == 4 and len(spec.parameters) == 12
    assert spec.parameters != list(ITL_PARAMETERS)
    values = _loss_at(spec, [0.05 * k for k in range(1, 20)] + [0.999])
    assert bool((values.diff() < 0).all())  # more mass on the true class, lower loss
    for key in ("command", "source_commit", "selection", "hardware", "date", "evaluation"):
        assert spec.provenance[key]


def test_the_shipped_losss_command_is_one_meta_train_accepts(tmp_path):
    import shlex

    from domainbed_itl.scripts.meta_train import build_parser

    command = LOSS_PRESETS["learned-RotatedMNIST"].provenance["command"]
    command = command.replace("<MNIST folder>", str(tmp_path)).replace("<run folder>", str(tmp_path / "run"))
    tokens = shlex.split(command)
    assert tokens[:3] == ["python", "-m", "domainbed_itl.scripts.meta_train"]
    args = build_parser().parse_args(tokens[3:])
    assert (args.preset, args.outer_steps, args.seed) == ("paper", 52, None)


@pytest.mark.parametrize("name, family, order, size", [
    ("stationary-RotatedMNIST", "taylor", 4, 12), ("composite-RotatedMNIST", "composite", None, 16)])
def test_a_searched_preset_says_how_it_was_found_and_its_command_reproduces_it(tmp_path, name, family,
                                                                             order, size):
    from domainbed_itl.scripts.meta_train import build_parser

    spec = resolve_loss(name)
    assert (spec.family, spec.order, len(spec.parameters)) == (family, order, size)
    for key in ("command", "source_commit", "selection", "hardware", "date", "evaluation"):
        assert spec.provenance[key]
    command = spec.provenance["command"]
    for placeholder, value in (("<MNIST folder>", tmp_path), ("<DomainBed>", tmp_path / "db"),
                               ("<run folder>", tmp_path / "run")):
        command = command.replace(placeholder, str(value))
    assert "<" not in command, "a placeholder the test does not know"
    tokens = shlex.split(command)
    assert tokens[:3] == ["python", "-m", "domainbed_itl.scripts.meta_train"]
    args = build_parser().parse_args(tokens[3:])
    assert (args.preset, args.outer_steps, args.per_domain_cap) == (
        spec.provenance["preset"], spec.provenance["steps"], spec.provenance["per_domain_cap"])
    assert args.seed in (None, spec.provenance["seed"]) and args.data_seed == spec.provenance["data_seed"]
    assert args.family in (None, spec.family)
    assert (REPO / spec.provenance["evaluation"]).is_file()


# The run folders (loss.json, metrics.jsonl) of the searches behind the presets, when this
# machine has them.
SEARCH_RUNS = {"stationary-RotatedMNIST": "DOMAINBED_ITL_TEST_STATIONARY_RUN",
               "composite-RotatedMNIST": "DOMAINBED_ITL_TEST_COMPOSITE_RUN"}


@pytest.mark.parametrize("name", list(SEARCH_RUNS))
def test_a_searched_preset_holds_its_runs_last_step(name):
    if SEARCH_RUNS[name] not in os.environ:
        pytest.skip(f"needs the search's run folder (set {SEARCH_RUNS[name]})")
    run = Path(os.environ[SEARCH_RUNS[name]])
    spec, saved = resolve_loss(name), load_loss(run / "loss.json")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert spec.parameters == saved.parameters == last["omega"]
    assert last["step"] == spec.provenance["steps"] == saved.provenance["steps"]
    for key in ("seed", "source_commit", "preset"):
        assert spec.provenance[key] == saved.provenance[key], key
    assert (saved.family, saved.order) == (spec.family, spec.order)
    assert saved.provenance["data"]["per_domain_cap"] == spec.provenance["per_domain_cap"]
