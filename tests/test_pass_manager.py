"""PassManager: runs requires -> run -> ensures -> verify, names the failing pass, dumps the model before it."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qpass.errors import PassError, PostconditionError, PreconditionError, VerificationError
from qpass.graph import WorkingGraph
from qpass.pass_manager import Pass, PassContext, PassManager, PassResult, Skip
from qpass.passes.cleanup import Cleanup
from qpass.verify import verify_model
from tests import builders


class Noop(Pass):
    def run(self, graph, ctx):
        return PassResult(modified=False, skipped=(Skip("conv", "Conv", "just because"),), stats={"n": 1})


class DanglingInput(Pass):
    """Broken on purpose: points the Relu at a tensor nothing produces."""

    def run(self, graph, ctx):
        relu = next(n for n in graph.nodes if n.op == "Relu")
        relu.inputs[0] = gs.Variable("nowhere", dtype=np.float32)
        return PassResult(modified=True)


class DuplicateNodeName(Pass):
    def run(self, graph, ctx):
        for n in graph.nodes:
            n.name = "same"
        return PassResult(modified=True)


class ZeroScale(Pass):
    """Inserts a Q/DQ pair whose scale is 0: valid for the ONNX checker, caught by qpass's own verifier."""

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "Conv")
        x = conv.inputs[0]
        scale = gs.Constant("s", np.array(0.0, np.float32))
        zp = gs.Constant("z", np.array(0, np.uint8))
        q = gs.Variable("xq", dtype=np.uint8)
        dq = gs.Variable("xdq", dtype=np.float32)
        graph.nodes += [gs.Node("QuantizeLinear", "q", inputs=[x, scale, zp], outputs=[q]),
                        gs.Node("DequantizeLinear", "dq", inputs=[q, scale, zp], outputs=[dq])]
        conv.inputs[0] = dq
        graph.toposort()
        return PassResult(modified=True)


class NeedsNothing(Pass):
    def requires(self, graph, ctx):
        raise PreconditionError("needs a calibration table", subject=self.name)

    def run(self, graph, ctx):  # pragma: no cover - never reached
        raise AssertionError


class BrokenPromise(Pass):
    def run(self, graph, ctx):
        return PassResult(modified=False)

    def ensures(self, graph, ctx):
        raise PostconditionError("left a Conv unquantized", subject="node 'conv'")


class WrongReturn(Pass):
    def run(self, graph, ctx):
        return True


def _manager(passes, **kw):
    wg = WorkingGraph(builders.conv_model())
    return wg, PassManager(passes, export=wg.export, verify=verify_model, **kw)


def test_records_time_skips_and_stats_per_pass():
    wg, pm = _manager([Noop(), Cleanup()])
    records = pm.run(wg.graph, PassContext())
    assert [r.name for r in records] == ["noop", "cleanup"]
    assert records[0].skipped[0].reason == "just because" and records[0].stats == {"n": 1}
    assert all(r.seconds >= 0 for r in records)
    assert not records[1].modified


def test_dangling_input_is_caught_and_names_the_pass_and_the_ones_before():
    wg, pm = _manager([Noop(), DanglingInput(), Cleanup()])
    with pytest.raises(PassError) as info:
        pm.run(wg.graph, PassContext())
    msg = str(info.value)
    assert "pass 'dangling_input' failed after ['noop']" in msg
    assert "nowhere" in msg  # the checker's finding is carried along
    assert isinstance(info.value.__cause__, VerificationError)


def test_duplicate_node_names_are_caught():
    wg, pm = _manager([DuplicateNodeName()])
    with pytest.raises(PassError, match="duplicate node name"):
        pm.run(wg.graph, PassContext())


def test_zero_scale_is_caught_by_the_qdq_invariants():
    wg, pm = _manager([ZeroScale()])
    with pytest.raises(PassError, match="scale must be finite and > 0"):
        pm.run(wg.graph, PassContext())


@pytest.mark.parametrize("bad, text", [(NeedsNothing(), "needs a calibration table"),
                                       (BrokenPromise(), "left a Conv unquantized"),
                                       (WrongReturn(), "returned bool, not PassResult")])
def test_requires_ensures_and_return_type_are_enforced(bad, text):
    wg, pm = _manager([bad])
    with pytest.raises(PassError, match=text):
        pm.run(wg.graph, PassContext())


def test_dump_dir_keeps_the_model_from_just_before_the_failing_pass(tmp_path):
    wg, pm = _manager([Noop(), DanglingInput()], dump_dir=tmp_path / "dump")
    with pytest.raises(PassError) as info:
        pm.run(wg.graph, PassContext())
    dumped = tmp_path / "dump" / "before_dangling_input.onnx"
    assert dumped.exists() and str(dumped) in str(info.value)
    model = onnx.load(str(dumped))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    assert next(n for n in model.graph.node if n.op_type == "Relu").input[0] == "c"


class Rename(Pass):
    def run(self, graph, ctx):
        graph.nodes[0].name = "renamed"
        return PassResult(modified=True)


def test_last_export_is_the_graph_after_the_last_change_or_none():
    """Stages reuse the export verified after the last changing pass instead of exporting (copying every weight)
    again; it is None when no pass changed the graph, or when nothing was exported (no verifier)."""
    wg = WorkingGraph(builders.conv_model())
    pm = PassManager([Rename(), Noop()], export=wg.export, verify=verify_model)
    pm.run(wg.graph, PassContext())
    assert pm.last_export is not None
    assert pm.last_export.SerializeToString() == wg.export().SerializeToString()
    assert pm.last_export.graph.node[0].name == "renamed"
    unchanged = PassManager([Noop()], export=wg.export, verify=verify_model)
    unchanged.run(wg.graph, PassContext())
    assert unchanged.last_export is None
    unverified = PassManager([Rename()], export=wg.export, verify=None)
    unverified.run(wg.graph, PassContext())
    assert unverified.last_export is None
