"""What the loss-evaluating commands show a user (scripts/_evaluation.py, evaluate_loss,
grid_search): every default in --help, an estimate of the run time before the work starts (from
inner steps timed here), the reports named at the end, and scipy's warnings said once in words."""

import argparse
import json
import warnings

import pytest
from scipy import stats

from domainbed_itl.meta.evaluate import Protocol
from domainbed_itl.scripts import evaluate_loss, grid_search
from domainbed_itl.scripts._evaluation import (TIES, DefaultsHelp, UnitTiming,
                                               describe_meta_estimate, said_once)

TINY = ["--dataset", "synthetic", "--per_domain_cap", "40", "--seeds", "0", "1", "--inner_steps",
        "10", "--hidden", "4", "--batch_size", "16", "--eval_size", "40"]


def _parsers():
    parser = evaluate_loss.build_parser()
    (sub,) = [a for a in parser._actions if a.choices and "meta" in a.choices]
    return {"grid_search": grid_search.build_parser(), "evaluate_loss meta": sub.choices["meta"],
            "evaluate_loss domainbed": sub.choices["domainbed"]}


@pytest.mark.parametrize("name", ["grid_search", "evaluate_loss meta", "evaluate_loss domainbed"])
def test_help_shows_every_default(name):
    parser = _parsers()[name]
    formatter = DefaultsHelp("prog")
    for action in parser._actions:
        if action.option_strings and not action.required and action.default not in (
                None, False, [], argparse.SUPPRESS):
            assert action.help, (name, action.option_strings)
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
    text = " ".join(parser.format_help().split())
    if name != "evaluate_loss domainbed":
        assert "(default: 0 1 2 3 4)" in text and "(default: 1000)" in text
    else:
        assert "(default: 2)" in text and "(default: local)" in text


def test_tied_seeds_are_said_once_in_words_and_no_raw_warning_shows(capsys):
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with said_once():
            for _ in range(3):  # differences equal to the last digit: scipy warns every time
                stats.ttest_rel([0.51, 0.52, 0.53], [0.41, 0.42, 0.43])
        with said_once():
            stats.ttest_rel([0.5, 0.7, 0.6], [0.4, 0.3, 0.45])  # no tie: nothing to say
    assert escaped == []
    assert capsys.readouterr().err == f"note: {TIES}.\n"


def test_the_estimate_says_what_it_timed_and_what_the_units_cost():
    timing = UnitTiming("CE", fixed_s=2.0, step_s=0.05)
    text = describe_meta_estimate(timing, Protocol(inner_steps=(1000, 3000)), 10)
    # one training read off at 1000 and 3000 steps: 2 + 3000 x 0.05 = 152 s a unit
    assert text.startswith("estimate (timed here on loss CE, seed 0, 22 inner steps): 50.0 ms an "
                           "inner step; a unit (a loss on a seed) of 3000 steps takes about 3 min")
    assert "the 10 units left about 25 min" in text
    capped = Protocol(inner_steps=(1000, 3000), inner_stop_ratio=0.1, inner_schedule="cosine")
    # one training per length, each capped: at most 2 + 4000 x 0.05 = 202 s a unit
    assert "of 4000 steps takes at most about 3 min" in describe_meta_estimate(timing, capped, 1)


def test_grid_search_estimates_first_and_ends_naming_its_reports(tmp_path, capsys):
    quiet, shown = tmp_path / "quiet", tmp_path / "shown"
    assert grid_search.main(["--grid", "focal=1", *TINY, "--output_dir", str(quiet),
                             "--no_progress"]) == 0
    capsys.readouterr()
    assert grid_search.main(["--grid", "focal=1", *TINY, "--output_dir", str(shown)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("estimate (timed here on loss focal:1, seed 0, 22 inner steps): ")
    assert "the 4 units left about" in out
    assert out.rstrip().splitlines()[-1] == (f"wrote {shown / 'grid.md'}, {shown / 'grid.json'}, "
                                             f"{shown / 'grid.csv'}")
    records = [json.loads((d / "grid.json").read_text())["records"] for d in (quiet, shown)]
    assert records[0] == records[1]  # timing first changes no result


def test_evaluate_loss_ends_naming_its_reports(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    assert evaluate_loss.main(["meta", "--losses", "CE", "LS", *TINY, "--output_dir", str(out_dir),
                               "--no_progress"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == f"wrote {out_dir / 'evaluation.json'}, {out_dir / 'evaluation.md'}"
