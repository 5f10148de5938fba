"""The metrics record's schema is its source: MetricsRecord declares every field an outer step
or a CMA-ES candidate writes, in the written order; building refuses what it does not declare."""

from __future__ import annotations

import json

import pytest
import torch

from domainbed_itl.files.schemas import MetricsRecord, PerDomain, SchemaError, check
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.data import synthetic_domains
from domainbed_itl.meta.trainer import MetaTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(step=1, inner_source_acc=0.5, outer_heldout_acc=0.25, outer_heldout_loss=1.5,
            per_domain={"heldout_acc": [0.25, 0.25]})


def _trainer(**settings):
    data = synthetic_domains(3, 48, 12, 3, seed=0, noise=1.5, degrees_per_domain=20)
    config = MetaConfig(inner_steps=20, hidden=(8,), hvp_batch=32, eval_size=None, batch_size=16,
                        **settings)
    return MetaTrainer(data.domains, data.num_classes, config)


def test_every_average_is_of_a_per_domain_value():
    means = MetricsRecord.means()
    assert {"inner_source_acc", "outer_heldout_loss", "inner_grad_norm_ratio"} <= set(means)
    assert set(means.values()) <= set(PerDomain.model_fields)
    assert means["inner_grad_norm_ratio"] == "stationarity"


@pytest.mark.parametrize("fields,message", [
    (dict(inner_gradnorm=1.0), "a metrics record has no field inner_gradnorm"),
    (dict(per_domain={"heldout_acc": [0.5], "heldout_accuracy": [0.5]}),
     "per_domain has no field heldout_accuracy"),
    (dict(reference={"cosine": 1.0, "cos": 1.0}), "reference has no field cos"),
])
def test_building_refuses_a_field_the_schema_does_not_declare(fields, message):
    with pytest.raises(TypeError, match=message):
        MetricsRecord.build(**{**BASE, **fields})


def test_building_refuses_a_wrong_value_by_name():
    with pytest.raises(SchemaError, match=r"outer_heldout_acc: .*less than or equal to 1.*got 1\.5"):
        MetricsRecord.build(**{**BASE, "outer_heldout_acc": 1.5})


def test_a_record_is_written_with_the_fields_given_in_the_schemas_order():
    record = MetricsRecord.build(objective="heldout_ce", aggregator_removed=None,
                                 **{**BASE, "step": 2}).line()
    assert list(record) == ["step", "inner_source_acc", "outer_heldout_acc", "outer_heldout_loss",
                            "per_domain", "objective", "aggregator_removed"]
    assert record["aggregator_removed"] is None  # given, so written, though None


@pytest.mark.parametrize("settings", [dict(reference_every=1),
                                      dict(inner_stop_every=5, inner_stop_ratio=0.5,
                                           spectrum_iters=2, max_solver_residual=1e6)])
def test_an_outer_steps_record_reads_back_as_written(settings):
    """Every field the trainer writes is declared (a reader that dropped one would differ), and
    each average is the mean of its per-domain values."""
    record = _trainer(**settings).outer_step()
    text = json.dumps(record)
    assert json.dumps(check(MetricsRecord, json.loads(text), "record").line()) == text
    for name, key in MetricsRecord.means().items():
        if key in record["per_domain"]:
            expected = torch.tensor(record["per_domain"][key], dtype=torch.float32).mean()
            assert record[name] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert ("reference" in record) == ("reference_every" in settings)
    assert ("hessian_lambda_max" in record) == ("spectrum_iters" in settings)


def test_a_candidates_record_is_the_schemas_without_its_step():
    trainer = _trainer(inner_stop_every=5, inner_stop_ratio=0.5)
    record = trainer.heldout_objective(trainer.omega, 3)
    assert "step" not in record
    built = check(MetricsRecord, {"step": 3, **record}, "candidate").line()
    assert json.dumps({k: v for k, v in built.items() if k != "step"}, sort_keys=True) == \
        json.dumps(record, sort_keys=True)
    assert set(record["per_domain"]) == {"heldout_loss", "heldout_acc", "heldout_ce",
                                         "inner_steps_used", "stationarity", "inner_at_cap"}
    assert record["inner_at_cap"] == sum(record["per_domain"]["inner_at_cap"])
