"""NF4 (QLoRA's 4-bit NormalFloat): each block of weights along the input features is scaled by its absolute
maximum and every value takes the nearest of 16 fixed levels, quantiles of N(0, 1) normalised to [-1, 1]."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ..qparams import MIN_SCALE

#: QLoRA's offset: the outermost quantile used, 1/2 (1/(2*15) + 1/(2*16)), so that the end levels are finite
NF4_OFFSET = 0.9677083


def nf4_codebook() -> np.ndarray:
    """The 16 NF4 levels, increasing, float32: 8 positive quantiles and 7 negative ones of N(0, 1) (the construction
    of QLoRA, Dettmers et al. 2023, and of bitsandbytes' ``create_normal_map``), an exact 0, scaled so that the ends
    are exactly -1 and 1. Not mirror-symmetric: the positive side has one level more."""
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
    return (levels / levels.max()).astype(np.float32)


#: the codebook, computed once
NF4_CODEBOOK = nf4_codebook()
#: the code of the level 0.0
NF4_ZERO = int(np.flatnonzero(NF4_CODEBOOK == 0.0)[0])


def nearest_code(x: np.ndarray, codebook: np.ndarray = NF4_CODEBOOK) -> np.ndarray:
    """Index (uint8) of the codebook level nearest to each value of ``x`` (a tie goes to the lower level)."""
    midpoints = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2
    return np.searchsorted(midpoints, np.asarray(x, dtype=np.float64), side="left").astype(np.uint8)


def block_absmax(w: np.ndarray, block_size: int) -> np.ndarray:
    """max |w| of each ``block_size`` rows of W [K, N]: [ceil(K / B), N] float32 (a last block may be shorter; an
    all-zero block gets the smallest positive scale)."""
    starts = np.arange(0, w.shape[0], block_size)
    scale = np.maximum.reduceat(np.abs(np.asarray(w, dtype=np.float32)), starts, axis=0)
    return np.maximum(scale, np.float32(MIN_SCALE)).astype(np.float32)


def nf4_quantize(w: np.ndarray, block_size: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (codes uint8 [K, N] in 0..15, scale float32 [ceil(K / B), N]): blocks of ``block_size`` rows
    share their absmax scale (or the given ``scale``) and each value takes the nearest level of w / scale."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"NF4 quantizes 2-D weights, not rank {w.ndim}")
    scale = block_absmax(w, block_size) if scale is None else np.asarray(scale, dtype=np.float32)
    full = np.repeat(scale, block_size, axis=0)[: w.shape[0]]
    return nearest_code(w / full), scale


def nf4_dequantize(codes: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """codebook[codes] x the block scale, float32 [K, N] (the products the written ONNX graph computes)."""
    full = np.repeat(np.asarray(scale, dtype=np.float32), block_size, axis=0)[: codes.shape[0]]
    return NF4_CODEBOOK[np.asarray(codes, dtype=np.int64)] * full
