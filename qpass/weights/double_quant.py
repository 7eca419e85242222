"""Double quantization of block scales (QLoRA, GGUF super-blocks): the positive float32 scales of a block-wise weight
stored as uint8 with one float32 scale per output channel, s = q x s2 with q in 1..255 (zero point 0)."""
from __future__ import annotations

import numpy as np

from ..qparams import MIN_SCALE


def quantize_scales(scale: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block scales (positive, any rank) -> (q uint8, s2 float32 [channels], dequantized scales float32 = q x s2):
    s2 = max over the channel's blocks / 255, q = round(scale / s2) clipped to 1..255 (no block scale becomes 0)."""
    scale = np.asarray(scale, dtype=np.float32)
    axis = channel_axis % scale.ndim
    others = tuple(a for a in range(scale.ndim) if a != axis)
    s2 = np.maximum(scale.max(axis=others) / np.float32(255), np.float32(MIN_SCALE)).astype(np.float32)
    shape = [1] * scale.ndim
    shape[axis] = -1
    s2b = s2.reshape(shape)
    q = np.clip(np.rint(scale / s2b), 1, 255).astype(np.uint8)
    return q, s2, (q.astype(np.float32) * s2b).astype(np.float32)
