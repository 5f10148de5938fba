"""The one way a command writes an output file (domainbed_itl.files.outputs): every problem is
found before any work, with one line naming the path, and nothing the command did not create is
replaced without --overwrite."""

from __future__ import annotations

import os

import pytest

from domainbed_itl.files.atomic import OutputExists
from domainbed_itl.files.outputs import OutputError, figure_format, plan_outputs


def test_a_plan_refuses_every_existing_file_before_writing_any(tmp_path):
    (tmp_path / "b.json").write_text("mine")
    with pytest.raises(OutputExists, match="b.json exists; pass overwrite=True") as refused:
        plan_outputs([tmp_path / "a.png", tmp_path / "b.json"])
    assert refused.value.remedy == ("overwrite",) and refused.value.paths == [str(tmp_path / "b.json")]
    assert not (tmp_path / "a.png").exists() and (tmp_path / "b.json").read_text() == "mine"
    plan = plan_outputs([tmp_path / "a.png", tmp_path / "b.json"], overwrite=True)
    plan.write(tmp_path / "b.json", "new")
    assert (tmp_path / "b.json").read_text() == "new"


def test_a_written_file_is_the_commands_own_and_may_be_rewritten(tmp_path):
    plan = plan_outputs([tmp_path / "report.md"])
    plan.write(tmp_path / "report.md", "1")
    plan.write(tmp_path / "report.md", "2")
    assert (tmp_path / "report.md").read_text() == "2"


def test_a_file_that_appears_while_the_command_works_is_not_replaced(tmp_path):
    plan = plan_outputs([tmp_path / "out.txt"])
    (tmp_path / "out.txt").write_text("someone else's")
    with pytest.raises(OutputExists):
        plan.write(tmp_path / "out.txt", "ours")
    assert (tmp_path / "out.txt").read_text() == "someone else's"


def test_only_planned_paths_are_written(tmp_path):
    plan = plan_outputs([tmp_path / "a.txt"])
    with pytest.raises(RuntimeError, match="not among the planned outputs"):
        plan.write(tmp_path / "b.txt", "x")
    assert not (tmp_path / "b.txt").exists()


def test_a_parent_that_is_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        plan_outputs([tmp_path / "file" / "sub" / "out.png"])


def test_missing_parents_are_made_when_writing_and_not_when_planning(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    plan = plan_outputs([target])
    assert not (tmp_path / "a").exists()
    plan.write(target, "x")
    assert target.read_text() == "x"


def test_a_folder_is_not_an_output_file(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        plan_outputs([tmp_path])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputError, match=f"no permission to write in {locked}"):
            plan_outputs([locked / "new" / "out.txt"])
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("name, problem", [("fig", "has no extension"),
                                           ("fig.xyz", "the extension .xyz")])
def test_a_figure_names_a_format_matplotlib_writes(tmp_path, name, problem):
    with pytest.raises(OutputError, match=problem) as error:
        plan_outputs([tmp_path / name], figures=[tmp_path / name])
    assert ".png" in str(error.value) and ".pdf" in str(error.value)
    assert figure_format(tmp_path / "fig.PDF") == "pdf"
