"""The README and docs/: CI runs the README's commands, links and anchors resolve, no machine's
paths, the command and layout tables list what exists, and measurements stay on results pages."""

import ast
import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RESULTS = REPO / "docs" / "results"
HOW_TO = [p for p in PAGES if RESULTS not in p.parents]
RESULT_PAGES = [p for p in PAGES if RESULTS in p.parents and p.name != "README.md"]
DATE = re.compile(r"\b\d{1,2} (January|February|March|April|May|June|July|August|September|"
                  r"October|November|December) \d{4}\b")


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


def _anchors(page):
    """GitHub's anchors of the headings of `page` (fenced code left out)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


def test_anchors_follow_githubs_rule():
    """The anchor rule itself, on headings whose GitHub anchors are known."""
    readme = _anchors(REPO / "README.md")
    assert {"set-up", "the-main-job-erm-against-itl-in-domainbed", "citation"} <= readme
    assert "the-c-cpu-kernel-is-opt-in" in _anchors(REPO / "docs" / "benchmarks.md")


def _links(page):
    """(page, target file or '', anchor or '') of every relative link in `page`."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if not re.match(r"[a-z]+://", target):
            yield target, anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    for target, anchor in _links(page):
        path = page.parent / target if target else page
        assert path.exists(), f"{page.name} links to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name} links to missing #{anchor} in {path.name}"


def _table(page, section):
    """The first cells (backticks removed) of the table under `## section` of `page`."""
    text = page.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip().strip("`") for row in rows]


def _commands():
    """The modules of domainbed_itl/scripts/ that are commands: they define main()."""
    return {path.stem for path in (REPO / "domainbed_itl" / "scripts").glob("*.py")
            if any(isinstance(node, ast.FunctionDef) and node.name == "main"
                   for node in ast.parse(path.read_text()).body)}


def test_the_commands_table_lists_every_command_and_only_commands():
    listed = _table(REPO / "docs" / "testing.md", "Commands")
    assert len(listed) == len(set(listed))
    assert set(listed) == _commands()
    assert "quickstart" in listed and "_trained_runs" not in listed


def test_the_layout_table_lists_every_package_folder_and_only_what_exists():
    listed = _table(REPO / "docs" / "testing.md", "Layout")
    folders = {f"{p.parent.relative_to(REPO)}/" for p in (REPO / "domainbed_itl").glob("*/__init__.py")}
    assert folders <= set(listed), folders - set(listed)
    assert all((REPO / path).exists() for path in listed), [p for p in listed if not (REPO / p).exists()]


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: str(p.relative_to(REPO)))
def test_how_to_pages_carry_no_dated_measurements(page):
    """A measurement carries its date; measurements live in docs/results/."""
    found = DATE.search(page.read_text())
    assert found is None, f"{page.name} holds a dated measurement ({found.group(0)}): move it to results/"


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda p: p.name)
def test_results_pages_carry_dates_and_are_listed(page):
    assert DATE.search(page.read_text()), f"{page.name} has no date"
    assert f"]({page.name})" in (RESULTS / "README.md").read_text(), f"{page.name} is not listed"


MAX_DOCSTRING_LINES = 8


def _modules_with_short_docstrings():
    yield from sorted((REPO / "domainbed_itl").rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules_with_short_docstrings()),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_a_module_docstring_is_a_summary_and_a_link_to_its_docs_page(path):
    """A few lines for a reader of the code; the depth lives in docs/, which the docstring names."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert 0 < len(docstring.splitlines()) <= MAX_DOCSTRING_LINES, docstring
    pages = re.findall(r"docs/[\w/]+\.md", docstring)
    assert pages and all((REPO / page).exists() for page in pages), pages


# ---------------------------------------------------------- documented defaults are the code's

REQUIRED = object()
# Defaults the tables give in words: the value the code holds for them.
IN_WORDS = {"(required)": REQUIRED, "none: clone": None, "WORKDIR/data": None,
            "every environment": None, "Taylor expansion of CE": None, "whole domain": None}


def _option_tables(page):
    """(flags, default cell) of each row of `page`'s tables whose columns are a flag (or option),
    then its default(s)."""
    rows, header = [], None
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif header[0] in ("flag", "option") and len(header) >= 3 and not set(cells[0]) <= set("-"):
            flags = re.findall(r"`(--\w+)`", cells[0])
            assert flags, f"{page.name}: a row of an option table names no flag: {line}"
            rows.append((flags, cells[1]))
    return rows


def _values(cell, n):
    """The `n` documented values of a default cell (one value may stand for every flag)."""
    cell = re.sub(r"\s*\(or [^)]*\)", "", cell).replace("`", "").strip()
    if cell in IN_WORDS:
        return [cell] * n
    values = [v.strip().strip("()") if v.strip() != "(required)" else v.strip()
              for v in cell.split(", ")]
    return values * n if len(values) == 1 else values


def _same(doc, code):
    if doc in IN_WORDS:
        return IN_WORDS[doc] is code or IN_WORDS[doc] == code
    if doc in ("off", "on", "none"):
        return {"off": code in (False, None, 0), "on": code is True, "none": code is None}[doc]
    if isinstance(code, (list, tuple)):
        return doc == " ".join(map(str, code))
    if isinstance(code, str):
        return doc == code
    try:
        return not isinstance(code, (str, bool)) and code is not None and float(doc) == float(code)
    except ValueError:
        return doc == str(code)


def _parser_defaults(parser):
    return {a.option_strings[0]: (REQUIRED if a.required else a.default)
            for a in parser._actions if a.option_strings}


def test_the_quickstarts_documented_defaults_are_its_defaults():
    from domainbed_itl.bridge.domainbed_env import DOMAINBED_URL
    from domainbed_itl.scripts.quickstart import build_parser

    IN_WORDS["GitHub"] = DOMAINBED_URL
    defaults = _parser_defaults(build_parser())
    rows = _option_tables(REPO / "docs" / "quickstart.md")
    assert {flag for flags, _ in rows for flag in flags} == set(defaults) - {"-h"}
    for flags, cell in rows:
        for flag, doc in zip(flags, _values(cell, len(flags)), strict=True):
            assert _same(doc, defaults[flag]), f"quickstart.md: {flag} documented {doc!r}, " \
                                               f"the code's default is {defaults[flag]!r}"


def test_meta_trains_documented_defaults_are_each_presets():
    """docs/meta_learning.md's option table: a column of values for the presets `paper` and
    `paper_guarded` (one value for both, or `paper / paper_guarded`), from the flag's own default
    or else the preset's configuration."""
    from domainbed_itl.meta.config import preset_config
    from domainbed_itl.scripts.meta_train import build_parser

    flags_defaults = _parser_defaults(build_parser())
    rows = _option_tables(REPO / "docs" / "meta_learning.md")
    assert len(rows) > 20
    for preset_index, preset in enumerate(("paper", "paper_guarded")):
        config = preset_config(preset)  # a setting reads by its flag's name
        for flags, cell in rows:
            cell = cell.split(" / ")[preset_index] if " / " in cell else cell
            if flags == ["--family", "--order"]:  # one value: the family and its order
                assert _same(_values(cell, 1)[0], f"{config.family}{config.order}"), cell
                continue
            for flag, doc in zip(flags, _values(cell, len(flags)), strict=True):
                code = flags_defaults[flag]
                code = getattr(config, flag[2:], None) if code is None else code
                assert _same(doc, code), (f"meta_learning.md, preset {preset}: {flag} documented "
                                          f"{doc!r}, the code's default is {code!r}")
