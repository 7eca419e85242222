"""QSpec and QuantPlan as data: validation with named errors, JSON round trips, overrides."""
from __future__ import annotations

import json

import pytest

from qpass.config import QuantConfig
from qpass.errors import PlanError
from qpass.graph import WorkingGraph
from qpass.plan.policy import build_plan
from qpass.plan.spec import Override, QSpec, QuantPlan
from tests import builders


def _plan(config: QuantConfig | None = None) -> QuantPlan:
    wg = WorkingGraph(builders.residual_model())
    return build_plan(wg.graph, config or QuantConfig())


@pytest.mark.parametrize("bad, message", [
    (dict(dtype="int3"), "dtype"),
    (dict(granularity="row"), "granularity"),
    (dict(granularity="channel"), "needs an integer axis"),
    (dict(granularity="block", axis=0), "block_size"),
    (dict(granularity="block", axis=0, block_size=0), "block_size"),
    (dict(granularity="tensor", axis=1), "takes no axis"),
    (dict(method="kl"), "method"),
    (dict(symmetric="yes"), "true or false"),
])
def test_invalid_specs_are_refused_with_the_reason(bad, message):
    with pytest.raises(PlanError, match=message):
        QSpec(**bad)


def test_block_and_4bit_specs_are_data_the_plan_can_hold():
    spec = QSpec(dtype="int4", granularity="block", axis=0, block_size=32)
    assert QSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.with_changes({"granularity": "tensor"}) == QSpec(dtype="int4")
    assert spec.with_changes({"granularity": "channel", "axis": 1}) == QSpec(dtype="int4", granularity="channel", axis=1)


def test_plan_json_round_trip_is_exact():
    plan = _plan()
    assert plan.nodes and plan.tensors
    again = QuantPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_the_plan_records_the_configured_specs():
    plan = _plan(QuantConfig(activation_type="int8", per_channel=False, method="mse"))
    assert {t.spec.dtype for t in plan.tensors.values()} == {"int8"}
    assert all(t.spec.symmetric and t.spec.method == "mse" for t in plan.tensors.values())
    assert all(n.weight.spec.granularity == "tensor" for n in plan.nodes if n.weight is not None)
    per_channel = _plan()
    assert all(n.weight.spec.granularity == "channel" for n in per_channel.nodes if n.weight is not None)


def test_moving_a_node_to_float_removes_it_from_every_reader_list():
    plan = _plan()
    victim = plan.nodes[0].node
    moved = plan.with_overrides([Override("node", victim, precision="float")])
    assert victim not in [n.node for n in moved.nodes]
    assert all(victim not in (t.readers or ()) for t in moved.tensors.values())
    assert any(s.node == victim and "plan" in s.reason for s in moved.skipped)
    # a tensor only that node read is no longer planned at all
    only = [n for n, t in plan.tensors.items() if t.readers == (victim,)]
    assert only and not set(only) & set(moved.tensors)


def test_regex_and_tensor_overrides():
    plan = _plan()
    names = list(plan.tensors)
    moved = plan.with_overrides([Override("tensor_regex", ".*", spec={"dtype": "uint16"})])
    assert {t.spec.dtype for t in moved.tensors.values()} == {"uint16"}
    dropped = plan.with_overrides([Override("tensor", names[0], precision="float")])
    assert names[0] not in dropped.tensors and len(dropped.tensors) == len(names) - 1
    convs = [n.node for n in plan.nodes if n.op_type == "Conv"]
    by_regex = plan.with_overrides([Override("node_regex", "c.*", precision="float")])
    assert not {n.node for n in by_regex.nodes} & {c for c in convs if c.startswith("c")}


@pytest.mark.parametrize("override, message", [
    ({"node": "x", "op_type": "Conv", "precision": "float"}, "exactly one of"),
    ({"node": "x"}, "must set"),
    ({"node": "x", "precision": "int8"}, "precision"),
    ({"node_regex": "(", "precision": "float"}, "invalid regular expression"),
    ({"tensor": "x", "weight": {"dtype": "int8"}}, "tensor override"),
    ({"op_type": "Conv", "spec": {"dtype": "int8"}}, "node override"),
])
def test_malformed_overrides_name_what_is_wrong(override, message):
    with pytest.raises(PlanError, match=message):
        QuantPlan.from_dict({**_plan().to_dict(), "overrides": [override]}, source="p.json")


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[]", "not a qpass plan"),
    ('{"nodes": [], "tensors": {"a": {"spec": {"dtype": "int8"}, "readers": "conv"}}}', "readers must be a list"),
    ('{"nodes": [{"node": "n", "op_type": "Conv", "activations": [true]}], "tensors": {}}', "input indices"),
    ('{"nodes": [{"node": "n", "op_type": "Conv", "notes": "hello"}], "tensors": {}}', "must be a list"),
    ('{"nodes": [], "tensors": {"a": {"spec": {"granularity": "channel", "axis": true}}}}', "integer axis"),
    ('{"nodes": [{"node": "n"}], "tensors": {}}', "malformed plan"),
    ('{"nodes": [], "tensors": {}, "schema_version": 9}', "schema_version"),
])
def test_malformed_plan_files_are_refused(text, message):
    with pytest.raises(PlanError, match=message):
        QuantPlan.from_json(text, source="p.json")
