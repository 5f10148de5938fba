"""The README and docs/: CI runs the README's commands, links resolve, no machine's paths."""

import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _setup_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return block.strip().splitlines()


def test_ci_runs_the_readmes_install_and_test_commands():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == _setup_commands() and len(ci) == 2


def test_readme_stays_short_and_names_the_main_job():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python -m domainbed_itl.scripts.quickstart --workdir" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_machine_paths(page):
    text = page.read_text()
    for pattern in (r"/work/", r"\.\./shared", r"/tmp/", r"mnist10k", r"/root/"):
        assert not re.search(pattern, text), f"{page.name} holds {pattern}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
