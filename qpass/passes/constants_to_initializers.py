"""Constant(value=W) -> initializer W, for Constant nodes (and Identity chains of constants) feeding a compute op's weight or bias.

In If branches too: a branch's Constant weight becomes an initializer of that branch.

Exporters often hold weights in ``Constant`` nodes or pass initializers through ``Identity``;
both hide a weight behind a Variable. Only weight/bias slots of the configured compute ops are
touched; shape constants and everything else stay as they are.
"""
from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind, is_onnx_op
from ..ops import WEIGHT_SLOTS
from ..pass_manager import Pass, PassContext, PassResult
from ..plan.targets import quantizable_scopes



class ConstantsToInitializers(Pass):
    def __init__(self, op_types=tuple(WEIGHT_SLOTS)):
        #: the compute op types whose weight and bias slots are looked at
        self.op_types = tuple(op_types)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        done: Counter = Counter()
        made: dict[str, gs.Constant] = {}
        new_name = NameAllocator(graph)
        for scope in quantizable_scopes(graph):  # an If branch's Constant weights become that branch's initializers
            self._convert(scope.graph, done, made, new_name)
        if done:
            graph.cleanup()
        return PassResult(modified=bool(done), stats=dict(done))

    def _convert(self, graph: gs.Graph, done: Counter, made: dict[str, gs.Constant], new_name: NameAllocator) -> None:
        outputs = {t.name for t in graph.outputs}
        for node in graph.nodes:
            slots = WEIGHT_SLOTS.get(node.op) if is_onnx_op(node) else None
            if not slots or node.op not in self.op_types:
                continue
            for i in slots:
                if i >= len(node.inputs):
                    continue
                t = node.inputs[i]
                if isinstance(t, gs.Constant) or not isinstance(t, gs.Variable) or t.name in outputs:
                    continue
                const = constant_behind(t)
                if const is None:
                    continue
                # a fresh initializer only for this consumer slot; the old chain is removed by cleanup if unused
                if t.name not in made:
                    made[t.name] = gs.Constant(new_name(f"{t.name}_const"), const.values)
                node.inputs[i] = made[t.name]
                done[node.op] += 1
