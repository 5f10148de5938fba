"""Every family declares its parameters' ranges, and `project` puts ω back inside them."""

from __future__ import annotations

import math

import pytest
import torch

from domainbed_itl.losses import ParameterRangeError, get_family
from domainbed_itl.losses.families import PROJECTION_MARGIN, family_names, get_family as lookup, project


@pytest.mark.parametrize("name, order, interval", [
    ("label_smoothing", None, "[0, 1)"), ("focal", None, "[0, inf)"), ("gce", None, "(0, 1]"),
    ("poly", 1, "[-1, inf)"), ("poly", 2, "[-1, inf)"), ("sce", None, "(-inf, inf)"),
    ("taylor", 4, "(-inf, inf)")])
def test_families_declare_their_ranges(name, order, interval):
    assert get_family(name, order).parameters[0].interval == interval
    if name == "poly" and order == 2:
        assert get_family(name, order).parameters[1].interval == "[-1/2, inf)"


@pytest.mark.parametrize("name, order, omega, expected, moved", [
    ("label_smoothing", None, [-0.03], [0.0], ("epsilon",)),
    ("label_smoothing", None, [1.2], [1.0 - PROJECTION_MARGIN], ("epsilon",)),
    ("label_smoothing", None, [0.2], [0.2], ()),
    ("focal", None, [-1.0], [0.0], ("gamma",)),
    ("gce", None, [0.0], [PROJECTION_MARGIN], ("q",)),
    ("gce", None, [1.5], [1.0], ("q",)),
    ("poly", 2, [-2.0, -0.75], [-1.0, -0.5], ("epsilon1", "epsilon2")),
    ("poly", 2, [3.0, -0.75], [3.0, -0.5], ("epsilon2",)),
    ("sce", None, [-5.0, 7.0], [-5.0, 7.0], ()),
])
def test_project_puts_omega_inside_and_names_what_moved(name, order, omega, expected, moved):
    family = get_family(name, order)
    projected, which = project(family, omega)
    assert projected == pytest.approx(expected, abs=1e-12) and which == moved
    family.check(projected)  # inside the range, open ends included
    as_tensor, which_t = project(family, torch.tensor(omega, dtype=torch.float32))
    assert as_tensor.dtype == torch.float32 and which_t == moved
    torch.testing.assert_close(as_tensor, torch.tensor(expected, dtype=torch.float32))


def test_every_registered_family_projects_its_default_to_itself():
    for name in family_names():
        family = lookup(name, 4 if name == "taylor" else 1 if name == "poly" else None)
        default = family.default_parameters(10)
        assert project(family, default) == (default, ())


def test_a_value_that_is_not_finite_has_no_projection():
    with pytest.raises(ParameterRangeError, match=r"epsilon of a label_smoothing loss must be finite "
                                                  r"to be projected into \[0, 1\), got epsilon=nan"):
        project(get_family("label_smoothing"), [math.nan])
    with pytest.raises(ValueError, match="has 1 parameter, got 2"):
        project(get_family("focal"), [1.0, 2.0])
