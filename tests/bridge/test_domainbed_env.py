"""import_domainbed: the checkout given wins over others on sys.path, and a process that already
imported another checkout says so. Two minimal checkouts stand in for DomainBed (no DomainBed
needed); sys.path and sys.modules are restored afterwards (conftest's isolated_imports)."""

import sys
import warnings

import pytest

from domainbed_itl.bridge.domainbed_env import import_domainbed


def _checkout(folder, label):
    (folder / "domainbed").mkdir(parents=True)
    (folder / "domainbed" / "__init__.py").write_text(f"LABEL = {label!r}\n")
    (folder / "domainbed" / "algorithms.py").write_text(f"LABEL = {label!r}\n")
    return folder


def test_the_given_checkout_wins_over_one_earlier_on_sys_path(tmp_path, isolated_imports):
    a, b = _checkout(tmp_path / "a", "a"), _checkout(tmp_path / "b", "b")
    sys.path[:0] = [str(a), str(b)]  # a first, b already present further down
    assert import_domainbed(b, "domainbed.algorithms").LABEL == "b"


def test_a_second_checkout_in_one_process_is_named_in_a_warning(tmp_path, isolated_imports):
    a, b = _checkout(tmp_path / "a", "a"), _checkout(tmp_path / "b", "b")
    assert import_domainbed(a, "domainbed.algorithms").LABEL == "a"
    with pytest.warns(UserWarning, match=f"already imported from {a}.*{b}"):
        assert import_domainbed(b, "domainbed.algorithms").LABEL == "a"
    with warnings.catch_warnings():  # the same checkout again: no warning
        warnings.simplefilter("error")
        import_domainbed(a, "domainbed.algorithms")
