"""Conv(x, W[, b]) -> Mul(k) with k a per-channel or scalar constant => Conv(x, W * k, b * k).

Paddle's LearnableAffineBlock (a scale and a bias after a Conv) and layer-scale factors write the scale as a
separate Mul. Folded, the int8 weights carry it, the Conv's output (after the scale, and after the bias Add that
fold_conv_bias_add then takes too) is the tensor quantized, and no float op sits between the integer Conv and its
QuantizeLinear. Only a constant whose non-unit dimension is the channel axis (see fold_conv_bias_add); with
per-tensor weights only a uniform scale (one value per channel would widen the weight's single range).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator
from .fold_conv_bias_add import FoldAfterConv


class FoldConvScaleMul(FoldAfterConv):
    op = "Mul"

    def __init__(self, per_channel_weights: bool = True):
        #: the weights get one scale per output channel; False: only a uniform scale folds
        self.per_channel_weights = per_channel_weights

    def fold(self, conv: gs.Node, w: gs.Constant, k: np.ndarray, new_name: NameAllocator) -> bool:
        if not self.per_channel_weights and np.ptp(k) != 0:
            return False
        wv = np.asarray(w.values, dtype=np.float32)
        conv.inputs[1] = gs.Constant(new_name(f"{w.name}_scaled"),
                                     (wv * k.reshape((-1,) + (1,) * (wv.ndim - 1))).astype(np.float32))
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            b = np.asarray(conv.inputs[2].values, dtype=np.float32)
            conv.inputs[2] = gs.Constant(new_name(f"{conv.name or w.name}_bias_scaled"), (b * k).astype(np.float32))
        return True
