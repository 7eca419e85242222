"""Structural roles of weight MatMuls (v/o projections, FFN down, tied head) on tiny synthetic transformer blocks,
and the k-mix preset as plan overrides."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph, node_label
from qpass.plan.policy import build_plan, more_bits
from qpass.plan.roles import find_roles

D, H, F = 16, 2, 32


def _transformer(layers: int = 2, seed: int = 0, *, gqa: bool = False, names: bool = True) -> onnx.ModelProto:
    """x [B, S, D] -> ``layers`` blocks of attention (q/k/v/o projections, softmax(q k^T) v) and a gated MLP
    (down(silu(gate(x)) * up(x))), residual adds -> y. ``gqa``: v passes through Unsqueeze/Expand/Reshape (repeated
    heads) on its way to attention. ``names``: False leaves every node unnamed (roles never come from names)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    dh = D // H

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, output, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=name if names else "", **attrs))
        return output

    split = const("split_shape", np.array([0, 0, H, dh], np.int64))
    merge = const("merge_shape", np.array([0, 0, D], np.int64))
    x = "x"
    for i in range(layers):
        def w(role, k, n):
            return const(f"L{i}.{role}", rng.normal(0, 0.3, (k, n)).astype(np.float32))

        q = node("MatMul", [x, w("wq", D, D)], f"q{i}", f"L{i}.q")
        k = node("MatMul", [x, w("wk", D, D)], f"k{i}", f"L{i}.k")
        v = node("MatMul", [x, w("wv", D, D)], f"v{i}", f"L{i}.v")
        q = node("Transpose", [node("Reshape", [q, split], f"qr{i}", f"L{i}.qr")], f"qt{i}", f"L{i}.qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, split], f"kr{i}", f"L{i}.kr")], f"kt{i}", f"L{i}.kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, split], f"vr{i}", f"L{i}.vr")], f"vt{i}", f"L{i}.vt", perm=[0, 2, 1, 3])
        if gqa:  # a repeat_kv-like detour: [B, H, S, dh] -> [B, H, 1, S, dh] -> Expand -> back
            u = node("Unsqueeze", [v, const(f"ax{i}", np.array([2], np.int64))], f"vu{i}", f"L{i}.vu")
            e = node("Expand", [u, const(f"ones{i}", np.ones(5, np.int64))], f"ve{i}", f"L{i}.ve")
            v = node("Squeeze", [e, const(f"ax2{i}", np.array([2], np.int64))], f"vs{i}", f"L{i}.vs")
        s = node("MatMul", [q, k], f"s{i}", f"L{i}.scores")
        s = node("Mul", [s, const(f"scale{i}", np.float32(dh ** -0.5))], f"ss{i}", f"L{i}.scale")
        p = node("Softmax", [s], f"p{i}", f"L{i}.softmax", axis=-1)
        a = node("MatMul", [p, v], f"a{i}", f"L{i}.pv")
        a = node("Reshape", [node("Transpose", [a], f"at{i}", f"L{i}.at", perm=[0, 2, 1, 3]), merge], f"ar{i}", f"L{i}.ar")
        o = node("MatMul", [a, w("wo", D, D)], f"o{i}", f"L{i}.o")
        x = node("Add", [x, o], f"h{i}", f"L{i}.res1")
        g = node("MatMul", [x, w("wg", D, F)], f"g{i}", f"L{i}.gate")
        u = node("MatMul", [x, w("wu", D, F)], f"u{i}", f"L{i}.up")
        act = node("Mul", [g, node("Sigmoid", [g], f"sg{i}", f"L{i}.sig")], f"act{i}", f"L{i}.silu")
        m = node("Mul", [act, u], f"m{i}", f"L{i}.glu")
        dn = node("MatMul", [m, w("wd", F, D)], f"d{i}", f"L{i}.down")
        x = node("Add", [x, dn], f"x{i + 1}", f"L{i}.res2")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out" if names else ""))
    graph = helper.make_graph(nodes, "tf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _roles_by_weight(model: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer -> role (the weight names say which projection it is; the finder never sees them)."""
    graph = WorkingGraph(model).graph
    roles = find_roles(graph)

    return {n.inputs[1].name: roles[node_label(n)] for n in graph.nodes if node_label(n) in roles}


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("names", [True, False])
def test_roles_come_from_the_wiring(gqa, names):
    found = _roles_by_weight(_transformer(2, gqa=gqa, names=names))
    assert found == {f"L{i}.{w}": role for i in range(2)
                     for w, role in (("wv", "v_proj"), ("wo", "o_proj"), ("wd", "ffn_down"))}


def test_an_ungated_mlp_and_a_plain_matmul_chain_have_no_roles():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(D, D)).astype(np.float32), n) for n in ("A", "B", "C")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["b"]), helper.make_node("Mul", ["b", "x"], ["m"]),
             helper.make_node("MatMul", ["m", "C"], ["y"])]  # Mul of a MatMul output and the input: no gate
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert find_roles(WorkingGraph(model).graph) == {}


def test_more_bits_is_llama_cpps_layer_choice():
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_k_mix_is_a_set_of_plan_overrides_that_the_rewrite_follows(tmp_path):
    model = _transformer(8)
    cfg = QuantConfig(weight_only="int4", block_size=16, weight_only_mix="k-mix", per_layer=False, latency=False)
    plan = build_plan(WorkingGraph(model).graph, cfg)
    assert {(o.match, o.value) for o in plan.overrides} == {("node", f"L{i}.{r}") for i in (0, 3, 6, 7)
                                                            for r in ("v", "down")}
    assert all(o.weight == {"dtype": "int8", "symmetric": True} for o in plan.overrides)
    out = qpass.quantize(model, config=cfg)
    inits = {t.name: t for t in out.model.graph.initializer}
    dq = {n.output[0]: n for n in out.model.graph.node if n.op_type == "DequantizeLinear"}
    types = {n.name: inits[dq[n.input[1]].input[0]].data_type for n in out.model.graph.node
             if n.op_type == "MatMul" and n.input[1] in dq}
    int8 = {name for name, t in types.items() if t == TensorProto.INT8}
    assert int8 == {f"L{i}.{r}" for i in (0, 3, 6, 7) for r in ("v", "down")}
    assert set(types) - int8 and all(types[n] == TensorProto.INT4 for n in set(types) - int8)
    # the same by hand: a plan saved without the preset, the overrides written into its JSON, loaded again
    plain = build_plan(WorkingGraph(model).graph, cfg.replace(weight_only_mix="none"))
    data = plain.to_dict()
    assert data["overrides"] == []
    data["overrides"] = [{"node": f"L{i}.{r}", "weight": {"dtype": "int8"}} for i in (0, 3, 6, 7) for r in ("v", "down")]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    by_hand = qpass.quantize(model, config=cfg.replace(weight_only_mix="none"), plan=str(path))
    assert sorted(t.SerializeToString() for t in by_hand.model.graph.initializer) == sorted(
        t.SerializeToString() for t in out.model.graph.initializer)


def test_k_mix_o_adds_the_output_projections_of_the_same_layers():
    model = _transformer(8, names=False)
    cfg = QuantConfig(weight_only="int4", block_size=16, weight_only_mix="k-mix-o")
    graph = WorkingGraph(model).graph
    plan = build_plan(graph, cfg)
    weight_of = {node_label(n): n.inputs[1].name for n in graph.nodes if n.op == "MatMul"}
    assert sorted(weight_of[o.value] for o in plan.overrides) == sorted(
        f"L{i}.{w}" for i in (0, 3, 6, 7) for w in ("wv", "wo", "wd"))


def test_mix_name_is_validated():
    with pytest.raises(qpass.QpassError, match="weight_only_mix"):
        QuantConfig(weight_only="int4", weight_only_mix="q4_k_m")


def test_the_command_line_options_reach_the_plan_and_the_output(tmp_path, capsys):
    from qpass.cli import main

    src, out, plan = tmp_path / "tf.onnx", tmp_path / "tf.q.onnx", tmp_path / "plan.json"
    onnx.save(_transformer(8), src)
    rc = main(["run", str(src), "-o", str(out), "--weight-only", "int4", "--block-size", "16", "--weight-only-mix",
               "k-mix", "--tied-head", "separate", "--allow-contrib-ops", "--save-plan", str(plan), "--no-validate",
               "--no-latency", "-q"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads(plan.read_text())
    assert len(saved["overrides"]) == 8 and {o["weight"]["dtype"] for o in saved["overrides"]} == {"int8"}
    model = onnx.load(out)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    assert bits == [4] * 48 + [8] * 8  # 7 weight MatMuls in each of 8 layers, 8 of them int8
