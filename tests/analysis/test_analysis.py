"""The analyses' pure functions (domainbed_itl.analysis) on tiny inputs with known answers."""

import json
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domainbed_itl.analysis.aggregate import mean_se
from domainbed_itl.analysis.entropy import entropy_by_correctness, prediction_entropy
from domainbed_itl.analysis.generalisation import accuracy_and_cross_entropy
from domainbed_itl.analysis.hessian import (FlatParameters, hessian_vector_product, landscape_1d,
                                            lanczos, mean_loss, residual, ritz_pairs)
from domainbed_itl.analysis.loss_profiles import (logits_for_p_true, loss_against_p_true,
                                                min_max_normalise, parse_loss)
from domainbed_itl.analysis.output import plan_analysis, write_outputs
from domainbed_itl.files.atomic import OutputExists
from domainbed_itl.losses import ITL_PARAMETERS, LossSpec, save_loss, taylor_loss_reference
from domainbed_itl.losses.zoo import sce

matplotlib.use("Agg")

P = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)


# --- entropy (Fig. 7) -------------------------------------------------------------------------

def test_entropy_of_known_distributions():
    probs = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    h = prediction_entropy(probs.log())
    assert h.tolist() == pytest.approx([1.5 * math.log(2), math.log(3), 0.0], abs=1e-12)
    # One logit column is a binary problem: z = 0 is a fair coin.
    assert prediction_entropy(torch.zeros(1, 1)).item() == pytest.approx(math.log(2))
    # Shifting logits changes nothing; sharpening lowers the entropy.
    z = torch.randn(4, 7)
    assert torch.allclose(prediction_entropy(z + 3.0), prediction_entropy(z))
    assert bool((prediction_entropy(5 * z) < prediction_entropy(z)).all())


def test_entropy_split_by_correctness():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 0, 0, 2])  # right, wrong, right, right
    result = entropy_by_correctness(probs.log(), target)
    h = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    assert result["entropy_correct"] == pytest.approx((h[0] + h[2] + h[3]) / 3)
    assert result["entropy_incorrect"] == pytest.approx(h[1])
    assert result["entropy_all"] == pytest.approx(sum(h) / 4)
    assert (result["n_correct"], result["n_incorrect"], result["accuracy"]) == (3, 1, 0.75)
    none_wrong = entropy_by_correctness(probs[[0, 2]].log(), target[[0, 2]])
    assert math.isnan(none_wrong["entropy_incorrect"]) and none_wrong["n_incorrect"] == 0
    with pytest.raises(ValueError, match="target must have shape"):
        entropy_by_correctness(probs.log(), target[:2])


# --- loss shapes (Fig. 5) ---------------------------------------------------------------------

def test_the_path_puts_p_true_on_the_true_class():
    probs = logits_for_p_true(P, 4).softmax(dim=1)
    assert torch.allclose(probs[:, 0], P)
    assert torch.allclose(probs[:, 1:], ((1 - P) / 3)[:, None].expand(-1, 3))


def test_cross_entropy_and_focal_against_their_closed_forms():
    loss, grad = loss_against_p_true(parse_loss("CE").fn, P, num_classes=10)
    assert torch.allclose(loss, -P.log()) and torch.allclose(grad, -1 / P)
    gamma = 2.0
    loss, grad = loss_against_p_true(parse_loss("Focal:gamma=2").fn, P, num_classes=10)
    assert torch.allclose(loss, -(1 - P) ** gamma * P.log())
    assert torch.allclose(grad, gamma * (1 - P) ** (gamma - 1) * P.log() - (1 - P) ** gamma / P)


def test_itl_against_the_term_by_term_definition_and_finite_differences():
    omega = torch.tensor(ITL_PARAMETERS, dtype=torch.float64)

    def reference(p):
        return taylor_loss_reference(logits_for_p_true(p, 7), torch.zeros(len(p), dtype=torch.long),
                                     omega, 4, reduction="none")

    loss, grad = loss_against_p_true(parse_loss("ITL").fn, P, num_classes=7)
    assert torch.allclose(loss, reference(P), atol=1e-6)
    h = 1e-6
    assert torch.allclose(grad, (reference(P + h) - reference(P - h)) / (2 * h), atol=1e-4)


def test_a_loss_file_is_read(tmp_path):
    path = save_loss(tmp_path / "isce.json", LossSpec("sce", None, [0.3, 0.7]))
    loss, _ = loss_against_p_true(parse_loss(str(path)).fn, P, num_classes=5)
    logits = logits_for_p_true(P, 5)
    assert torch.allclose(loss, sce(logits, torch.zeros(len(P), dtype=torch.long), 0.3, 0.7,
                                    reduction="none"))


@pytest.mark.parametrize("spec, message", [
    ("Hinge", "'Hinge' is neither a zoo loss (CE, BCE, Focal, SCE, GCE, LS"),
    ("Focal:gama=1", "'gama=1' is not NAME=VALUE with NAME one of gamma"),
    ("Focal:gamma=big", "gamma must be a number, got 'big'"),
    ("CE:gamma=1", "CE has no parameter"),
])
def test_bad_loss_names_are_refused_naming_them(spec, message):
    with pytest.raises(ValueError) as error:
        parse_loss(spec)
    assert message in str(error.value)


def test_p_true_must_be_inside_the_unit_interval():
    with pytest.raises(ValueError, match="strictly inside"):
        loss_against_p_true(parse_loss("CE").fn, [0.0, 0.5], 3)


def test_min_max_normalise():
    values, grad = min_max_normalise(torch.tensor([2.0, 4.0, 6.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert values.tolist() == [0.0, 0.5, 1.0] and grad.tolist() == [0.25, 0.5, 0.75]


# --- Hessian, Lanczos, landscape (Fig. 8) ----------------------------------------------------

class _Identity(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, _):
        return self.w


def _quadratic(n=24, seed=0, values=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = values if values is not None else torch.linspace(-1.0, 4.0, n, dtype=torch.float64)
    h = q @ torch.diag(lam) @ q.T
    flat = FlatParameters(_Identity(n))
    matvec = hessian_vector_product(flat, lambda w, _: 0.5 * w @ h @ w, [(torch.zeros(1), torch.zeros(1))],
                                    flat.theta)
    return flat, matvec, q, lam, h


def test_lanczos_finds_the_top_eigenvector_of_a_known_quadratic():
    flat, matvec, q, lam, _ = _quadratic()
    start = torch.randn(len(lam), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    value, vector = lanczos(matvec, start, steps=len(lam)).top()
    assert value == pytest.approx(4.0, abs=1e-10)
    assert abs(float(vector @ q[:, -1])) == pytest.approx(1.0, abs=1e-10)
    assert residual(matvec, value, vector) < 1e-10
    # Fewer steps than dimensions: the top of a well-separated spectrum converges first.
    sep = torch.cat([torch.linspace(0.0, 1.0, 23, dtype=torch.float64),
                     torch.tensor([10.0], dtype=torch.float64)])
    _, matvec, q, _, _ = _quadratic(values=sep)
    value, vector = lanczos(matvec, start, steps=8).top()
    assert value == pytest.approx(10.0, rel=1e-8) and abs(float(vector @ q[:, -1])) > 1 - 1e-8


def test_lanczos_returns_the_largest_eigenvalue_not_the_largest_in_magnitude():
    values = torch.tensor([-9.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    _, matvec, q, _, _ = _quadratic(n=4, values=values)
    value, vector = lanczos(matvec, torch.ones(4, dtype=torch.float64), steps=4).top()
    assert value == pytest.approx(2.0) and abs(float(vector @ q[:, -1])) == pytest.approx(1.0)


def test_lanczos_stops_on_an_invariant_subspace_and_refuses_a_zero_start():
    _, matvec, q, _, _ = _quadratic()
    pairs = lanczos(matvec, q[:, 5] + q[:, 9], steps=20)
    assert pairs.steps == 2 and sorted(pairs.values.tolist()) == pytest.approx(
        [float(v) for v in torch.linspace(-1.0, 4.0, 24, dtype=torch.float64)[[5, 9]]])
    with pytest.raises(ValueError, match="non-zero"):
        lanczos(matvec, torch.zeros(24, dtype=torch.float64), steps=3)


def test_ritz_pairs_live_on_the_basis_device():
    """On a GPU the Lanczos basis lives on the device while the small tridiagonal problem is
    solved on the CPU: the Ritz vectors and values must come back on the device. The meta device
    stands in for the GPU here; it cannot run the Lanczos loop itself (its scalars are read
    with .item()), so the test covers the Ritz step, where the CPU eigenvectors meet the basis."""
    basis = [torch.empty(7, device="meta") for _ in range(3)]
    pairs = ritz_pairs([1.0, 2.0, 3.0], [0.5, 0.25], basis)
    assert pairs.vectors.device.type == "meta" and pairs.values.device.type == "meta"
    assert pairs.vectors.shape == (3, 7) and pairs.vectors.dtype == torch.float32
    # On the CPU the same step gives the eigenpairs of the tridiagonal in the basis.
    q, _ = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    pairs = ritz_pairs([1.0, 2.0, 3.0], [0.5, 0.25], list(q.T))
    t = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 0.25], [0.0, 0.25, 3.0]], dtype=torch.float64)
    h = q @ t @ q.T
    for value, vector in zip(pairs.values, pairs.vectors):
        torch.testing.assert_close(h @ vector, value * vector)


def test_hessian_vector_products_match_the_dense_hessian_of_a_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    flat = FlatParameters(net)
    dense = torch.autograd.functional.hessian(lambda t: F.cross_entropy(flat.outputs(t, x), y), flat.theta)
    # Two unequal batches: the product is of the mean loss over all 20 samples.
    matvec = hessian_vector_product(flat, F.cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])], flat.theta)
    v = torch.randn(len(flat.theta), dtype=torch.float64)
    assert torch.allclose(matvec(v), dense @ v, atol=1e-12)
    value, _ = lanczos(matvec, v, steps=len(v)).top()
    assert value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)
    assert float(mean_loss(flat, F.cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])], flat.theta)) == \
        pytest.approx(float(F.cross_entropy(net(x), y).detach()))


def test_landscape_along_an_eigenvector_of_a_quadratic_is_its_parabola():
    flat, matvec, q, lam, h = _quadratic()
    theta = torch.zeros(len(lam), dtype=torch.float64)
    ts = [-1.0, -0.5, 0.0, 0.5, 1.0]
    values = landscape_1d(lambda t: 0.5 * t @ h @ t, theta, q[:, -1], ts)
    assert values == pytest.approx([0.5 * 4.0 * t * t for t in ts])


# --- Table 7 metrics, aggregation, output ----------------------------------------------------

def test_accuracy_and_cross_entropy():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    result = accuracy_and_cross_entropy(probs.log(), torch.tensor([0, 0]))
    assert result["accuracy"] == 0.5 and result["n"] == 2
    assert result["cross_entropy"] == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    with pytest.raises(ValueError, match="no samples"):
        accuracy_and_cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_mean_and_standard_error_as_domainbed_reports_them():
    result = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert result["mean"] == 2.0 and result["n"] == 3 and (result["min"], result["max"]) == (1.0, 3.0)
    assert result["se"] == pytest.approx(math.sqrt(2 / 3) / math.sqrt(3))
    assert mean_se([])["n"] == 0 and math.isnan(mean_se([])["mean"])


def test_outputs_are_written_together_or_not_at_all(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    plan = plan_analysis(tmp_path, "fig", text_suffixes=[".csv"])
    paths = write_outputs(plan, fig, {"a": float("nan"), "b": (1, 2)}, {".csv": "x\n1\n"})
    assert sorted(p.name for p in paths) == ["fig.csv", "fig.json", "fig.png"]
    assert json.loads((tmp_path / "fig.json").read_text()) == {"a": None, "b": [1, 2]}
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text("keep")
    with pytest.raises(OutputExists, match="other.json"):
        plan_analysis(tmp_path, "other")
    assert (tmp_path / "other.json").read_text() == "keep" and not (tmp_path / "other.png").exists()
    write_outputs(plan_analysis(tmp_path, "other", overwrite=True), fig, {"a": 1})
    assert json.loads((tmp_path / "other.json").read_text()) == {"a": 1}
    plt.close(fig)


# --- the Fig. 5 command (needs no DomainBed) ---------------------------------------------------

def test_loss_shapes_command(tmp_path):
    import subprocess
    import sys

    path = save_loss(tmp_path / "isce.json", LossSpec("sce", None, [0.3, 0.7]))
    out = tmp_path / "fig5"
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses", "CE", "Focal:gamma=2",
         "ITL", str(path), "--labels", "CE", "Focal", "ITL", "iSCE", "--num_classes", "7", "--points", "11",
         "--output_dir", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "loss_shapes.json").read_text())
    assert [c["label"] for c in data["losses"]] == ["CE", "Focal", "ITL", "iSCE"]
    p = torch.tensor(data["p_true"], dtype=torch.float64)
    assert len(p) == 11 and data["num_classes"] == 7
    assert data["losses"][0]["loss"] == pytest.approx((-p.log()).tolist())
    assert min(data["losses"][2]["loss_normalised"]) == 0 and max(data["losses"][2]["loss_normalised"]) == 1
    assert (out / "loss_shapes.png").read_bytes()[:4] == b"\x89PNG"
    assert "ITL" in result.stdout and "wrote" in result.stdout
    again = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses", "Hinge",
                            "--output_dir", str(tmp_path / "bad")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "'Hinge' is neither a zoo loss" in again.stderr
    assert not (tmp_path / "bad").exists()
