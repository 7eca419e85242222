"""Conv followed by any chain of per-channel scale Muls and bias Adds => one Conv (FoldConvScaleMul and FoldConvBiasAdd
in turn until neither folds more).

Exporters write a Conv's bias, a learnable scale and a second bias in either order (PP-OCRv5: Conv -> Add(bias) ->
Mul(scale) -> Add(bias); PP-OCRv4: Conv(bias) -> Mul -> Add). Each fold takes only the op right after the Conv, so
the two run in turn.
"""
from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from ..pass_manager import Pass, PassContext, PassResult
from .fold_conv_bias_add import FoldConvBiasAdd
from .fold_conv_scale_mul import FoldConvScaleMul

#: at most this many rounds (a chain of more affine ops than that is left partly unfolded)
MAX_ROUNDS = 8


class FoldConvAffine(Pass):
    def __init__(self, per_channel_weights: bool = True):
        #: passed to FoldConvScaleMul: with per-tensor weights only a uniform scale folds
        self.per_channel_weights = per_channel_weights

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        for _ in range(MAX_ROUNDS):
            folded = 0
            for fold in (FoldConvScaleMul(self.per_channel_weights), FoldConvBiasAdd()):
                result = fold.run(graph, ctx)
                stats.update(result.stats)
                folded += sum(result.stats.values())
            if not folded:
                break
        return PassResult(modified=bool(stats), stats=dict(stats))
