"""qpass.graph.export_onnx: onnx-graphsurgeon's export byte for byte, the main graph's weights copied once."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qpass.graph import WorkingGraph, export_onnx
from qpass.io import inferred_view
from tests import builders, subgraph_models


def _models():
    yield "digits", onnx.load(str(builders.DIGITS_MODEL))
    yield "conv", builders.conv_model(weight_as_constant_node=True)
    yield "residual", builders.residual_model()
    yield "digits_in_if", subgraph_models.digits_in_if()
    yield "nested_if", subgraph_models.nested_if()[0]
    yield "loop", subgraph_models.matmul_in_loop()
    yield "scan", subgraph_models.matmul_in_scan()[0]


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_same_bytes_as_graphsurgeon(name, model):
    with inferred_view(model):
        graph = WorkingGraph(model).graph
    # a value loaded and changed (a numpy Constant, exported through from_array) besides the lazy ones
    first = next((t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.size > 1), None)
    if first is not None:
        first.values = np.ascontiguousarray(first.values) * 2
    assert export_onnx(graph).SerializeToString() == gs.export_onnx(graph, do_type_check=True).SerializeToString()


def test_model_fields_kept():
    model = onnx.load(str(builders.DIGITS_MODEL))
    graph = gs.import_onnx(model)
    graph.producer_name, graph.ir_version = "qpass-test", 9
    ours, theirs = export_onnx(graph), gs.export_onnx(graph, do_type_check=True)
    assert ours.producer_name == "qpass-test" and ours.ir_version == 9
    assert ours.SerializeToString() == theirs.SerializeToString()
