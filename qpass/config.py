"""QuantConfig: the frozen, validated description of one quantization run, loadable from TOML."""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calib.methods import METHODS
from .errors import ConfigError
from .ops import COMPUTE_OPS, NEIGHBOUR_OPS, QDQ_MIN_OPSET

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

FORMATS = ("qdq", "qop")
#: ``auto``: with 8-bit activations, percentile for tensors a Conv/ConvTranspose reads or writes and min-max for
#: the rest; with 16-bit activations, min-max everywhere (both chosen by measurement on the shared/models suite,
#: see docs/benchmark-notes.md)
METHOD_CHOICES = ("auto",) + METHODS
AUTO_PERCENTILE_OPS = frozenset({"Conv", "ConvTranspose"})
ACTIVATION_TYPES = ("uint8", "int8", "uint16", "int16")
SIXTEEN_BIT_TYPES = frozenset({"uint16", "int16"})
CALIB_EPS = ("cpu", "cuda")
WEIGHT_TYPES = ("int8",)
#: weight-only mode types: int4/int8 symmetric (zero point 0), uint4 asymmetric (zero point from the block's range),
#: nf4 (QLoRA's NormalFloat codebook, block absmax), ternary ({-1, 0, 1} x block absmean, int2, opset 25)
WEIGHT_ONLY_TYPES = ("int4", "uint4", "int8", "nf4", "ternary")
#: hard-swish on integer kernels: the exact forms, also the offset form (one more rounding), or none
INTEGER_HARD_SWISH = ("on", "offsets", "off")
#: what the precision search optimises besides the accuracy target (qpass.search.latency)
OBJECTIVES = ("accuracy", "latency")
#: weight-only types rounded to the nearest level of their grid only (no GPTQ or scale search)
NEAREST_ONLY_TYPES = ("nf4", "ternary")
#: weight-only algorithms: round to nearest; a data-free per-block scale search; GPTQ; activation-aware scaling with a
#: clipping search (AWQ); AWQ's scaling then GPTQ (the last three need calibration data)
WEIGHT_ONLY_ALGORITHMS = ("auto", "rtn", "search", "gptq", "awq", "awq-gptq")
#: weight-only output head tied to the embedding table: "once" (the head reads the table's int8 rows), "separate"
WEIGHT_ONLY_TIED = ("once", "separate")
#: weight-only mixed-precision presets (qpass.plan.policy.MIXES): "none", or "k-mix" (int8 for the attention value
#: and FFN down projections of the first, last and every third layer, after llama.cpp's Q4_K_M), "k-mix-o" (the
#: attention output projections of those layers too)
WEIGHT_ONLY_MIXES = ("none", "k-mix", "k-mix-o")
#: static bias correction: none, or each bias moved by the measured float - quantized output mean (sequentially)
BIAS_CORRECTIONS = ("off", "empirical")
#: the float16 mode's half types (float_type)
FLOAT_TYPES = ("float16", "bfloat16")
#: SmoothQuant before static 8-bit quantization: "off" or "on"
SMOOTH_QUANT = ("off", "on")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a run writes. Invalid values raise :class:`ConfigError`.

    Attributes:
        format: output form; ``"qdq"`` writes standard QuantizeLinear/DequantizeLinear pairs, ``"qop"`` lowers
            them to integer operators (QLinearConv, QLinearMatMul, MatMulInteger/ConvInteger sequences).
        method: calibration method for activation ranges: auto (default), minmax, percentile, mse or entropy.
            ``auto`` uses percentile for tensors that a Conv/ConvTranspose reads or writes and min-max for the
            rest: on the shared/models suite it was the most accurate overall (percentile helps the CNNs, and
            clipping hurts the transformer's MatMul inputs). With 16-bit activations ``auto`` is min-max
            everywhere: a 16-bit step is too fine for clipping to pay, and percentile's clipped outliers cost
            every shared CNN accuracy there (detector mask IoU 0.979 against 0.992 with min-max).
        range_choice: with ``auto``, 8-bit activations and held-out samples (a validation split or ``val``), the
            ranges ``auto`` clips at the percentile are also tried with min-max and with MSE (from the same
            calibration) and the rule whose rewrite gives the held-out split's worst output the highest SQNR is kept;
            another rule must beat percentile by ``range_choice_margin_db``. Which rule fits depends on the model
            (measured: docs/benchmark-notes.md); costs two more rewrites and validation runs (outputs only).
        range_choice_margin_db: the SQNR gain (dB) over percentile another rule needs to be kept; 3 dB is half the
            output's noise power. At 0.5 dB the choice also moved four models whose task metrics then moved both
            ways by up to 0.018 (docs/benchmark-notes.md).
        percentile: the percentile kept by ``percentile`` (two-tailed; one threshold on |x| when symmetric).
        bins: bins of the streaming histogram behind percentile, mse and entropy.
        kl_levels: quantized levels the entropy (KL) search compares against (128, the magnitudes of an 8-bit
            grid; 256 times that for 16-bit activations, which keeps their whole range). With asymmetric
            unsigned activations a mostly one-signed tensor gets up to 2 x kl_levels - 1, the unsigned grid's
            levels on the side of its largest |x| (qpass.calib.observers.kl_levels).
        hist_sample: values of each sample's tensor that the histogram counts, at most (about); a larger tensor
            is walked with a prime stride that divides none of its dimensions (every channel and position class
            stays represented). Its min and max still cover every value. 0 counts every value. Measured on the
            shared/models CNNs: docs/benchmark-notes.md.
        tensor_methods: method per activation tensor, keyed by name or full-match regex (wins over op_methods).
        op_methods: method per compute op type that reads or writes the tensor (e.g. {"Conv": "percentile"}).
        output_consumers: "all" quantizes such an output whatever reads it; "quantized" only when every reader
            is a quantized compute op (or data movement leading to one), so no float op sees a quantized value.
        bias: "int32" (scale s_x * s_w, zero point 0; what integer kernels fuse) or "float" (the bias stays a
            float initializer in the file, for runtimes that want to quantize it themselves). Measured on
            onnxruntime-gpu 1.31.1: "float" does not keep the bias on the GPU there, because onnxruntime's own
            optimizer re-quantizes it (it adds ``<conv>_bias_dq`` int32 DequantizeLinear nodes), and those run on
            the CPU like qpass's (docs/gpu-validation.md). "float" needs format qdq.
        neighbour_ops: join and pooling ops (Add, Concat, AveragePool, GlobalAveragePool) that run in int8
            when all their float inputs are quantized: they read them dequantized and get a quantized output
            of their own (calibrated), so int8 flows through residual blocks. () turns it off.
        single_reader_dq: give a DequantizeLinear read by several float element-wise ops (a GELU's Div and Mul)
            one reader, an Add of 2**-60 (exact on every non-zero DQ value), so onnxruntime does not copy the DQ
            per reader and still fuses the pattern (Gelu). Measured on the shared OCR models: docs/benchmark-notes.md.
        integer_hard_swish: "on": a hard-swish between uint8 Q/DQ pairs (HardSwish, x * HardSigmoid(x),
            x * Clip(x + 3, 0, 6) / 6, times a constant) is written as a dequantize scaled by the slope, an Add of
            the offset, a saturating Q/DQ pair on [0, 1] (the clip) and a Mul, so onnxruntime runs QLinearAdd and
            QLinearMul instead of float kernels between Q/DQ (the orientation CNN: x1.30 -> x1.00 fp32's latency); the
            gate's rounding to 1/255 is the only new error. "offsets": also a hard-swish followed by a constant offset
            (a learnable affine block's bias, before a padded Conv), which costs one more rounding (measured faster
            and less accurate on PP-OCRv4/v5, so not the default; docs/benchmark-notes.md). "off": left in float.
        activation_matmuls: also quantize both inputs of activation x activation MatMuls (attention's Q.K^T and
            softmax.V). Off by default.
        calib_batch_size: samples of equal shape concatenated into one onnxruntime run (results do not change).
        calib_overlap: let the histogram updates run on a worker thread while onnxruntime, with one intra-op
            thread fewer, computes the next sample, where timed first runs show it faster (CPU provider only;
            the ranges do not change). Peak memory then holds two samples' activations instead of one
            (orientation CNN +27-32 MB on 2 CPUs, recognizer +75 MB on 16). False keeps the updates in turn.
        calib_ep: execution provider for calibration, "cpu" or "cuda" (falls back to the CPU with a warning).
        activation_type: ``"uint8"`` (asymmetric, zero point from the range) or ``"int8"``
            (symmetric, zero point 0).
        weight_type: integer type of weights, always symmetric.
        per_channel: weights get one scale per output channel (needs opset >= 13).
        equalize: cross-layer equalization before planning (static mode): for Conv -> [Relu, LeakyRelu, PRelu,
            Identity, pooling] -> Conv chains, output channel c of the first Conv is divided by s_c and input channel
            c of the second multiplied by it, s_c = sqrt(r1_c / r2_c) from the two weight ranges (Nagel et al. 2019),
            so both Convs' per-channel weight ranges match; the float function is unchanged and no node is added.
            Pairs with a non-homogeneous op between them (HardSwish, Relu6, Sigmoid, ...) are skipped and named.
            None (default): on with per-tensor weights (``per_channel`` false), where it measured better on every
            shared CNN, off with per-channel weights, where it measured mixed (docs/benchmark-notes.md).
        quantize_outputs: compute op types whose outputs are quantized too (after a Relu/Clip), so runtimes fuse
            integer kernels (DQ -> Conv -> Q). MatMul is left out by default: onnxruntime fuses DQ -> MatMul
            without an output Q, and quantizing MatMul outputs costs transformers accuracy (measured on MiniLM).
        op_types: the compute ops whose inputs and weights are quantized.
        exclude_nodes: node names, or regular expressions matched in full, never quantized.
        exclude_before: op types (e.g. HardSwish) such that a compute node whose output is read only by them stays
            in float. For a runtime that fuses the op into its float kernel but has no integer one: onnxruntime's
            CPU provider runs Conv + HardSwish as one fp32 kernel, while an int8 Conv leaves the HardSwish in float
            between a DequantizeLinear and a QuantizeLinear (the orientation CNN: x1.77 fp32's latency by
            default, x0.97 with HardSwish here; docs/benchmark-notes.md).
        float_before_log: a compute node whose output reaches a Log (in its graph or in a body) through linear and
            magnitude ops only stays in float: data movement, Pad, Concat, products, sums, Sqrt, a lower clamp
            (Clip with no max, Max with a constant), an Add/Sub of two computed tensors only when both are
            magnitudes (re^2 + im^2: a residual join stops the walk), up to two compute nodes in a row. A log
            spectrogram computed in the graph turns the absolute error of 8-bit values into unbounded relative error
            on its quiet bins (measured: docs/benchmark-notes.md).
        target_opset: upgrade the model to this opset (onnx.version_converter) first.
        opset_upgrade: a model below the opset the run needs (13 for per-channel weights, 10 for QuantizeLinear, 21 for
            16-bit activations and block-wise weight-only, 25 for ternary) is upgraded to it with onnx.version_converter,
            with a warning, when its inputs and outputs survive the upgrade; the result is then validated against the
            original. False: refuse it, naming --target-opset.
        val_fraction: share of the calibration samples held out for validation when no
            separate validation data is given.
        max_calib_samples: use at most this many calibration samples.
        synthetic_calib: allow random calibration data (loudly reported).
        synthetic_samples: how many random samples to draw then.
        seed: seed of everything random (synthetic data).
        min_cosine: if set, a validated output cosine below this fails the run (exit 1).
        min_sqnr: if set, a validated output SQNR (dB) below this fails the run (exit 1).
        min_top1: if set, a validated output top-1 agreement below this fails the run (exit 1).
        collapse_check: with no minimum set, a validated output that is broken rather than degraded fails the run
            (exit 1): a language model's perplexity over 1.5x fp32's, another output under 10 dB SQNR.
        collapse_rescue: static quantization with 8-bit activations whose output the collapse check finds broken is
            quantized again with 16-bit activations (uint16/int16 Q/DQ, opset 21, the weights still int8) and that
            output is kept when it is not broken (a warning says so); False: the run fails as the check says.
        providers: execution providers to validate on ("cpu", "cuda"); empty: CPU, and CUDA when available.
        validate: compare the result with the original on onnxruntime (False: the report says it was not validated).
        per_layer: rank the layers by the error they add (one more run per validation sample).
        latency: time fp32 and quantized on each provider (median of alternated runs).
        max_val_samples: hold out at most this many samples for validation.
        external_data: write the weights to a ``.data`` file beside the model.
        allow_empty: a run that quantizes nothing is not an error.
        dynamic: dynamic quantization (no calibration data needed): MatMul/Gemm weights int8 per output channel
            offline, their activations quantized at run time (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul,
            standard ONNX; onnxruntime fuses it into its dynamic kernels), embedding tables int8 per row
            (``weight_only_embeddings``); other ops stay float. Dynamic specs can also be mixed into a static plan
            per tensor (qpass.plan.dynamic).
        weight_only: None (static quantization of weights and activations) or the weight type of the weight-only
            mode: "int4" (symmetric), "uint4" (asymmetric, a zero point per block), "int8" (symmetric), "nf4" (QLoRA's
            16-level NormalFloat codebook x block absmax, written as uint4 codes -> Cast -> Gather -> Mul) or
            "ternary" ({-1, 0, 1} x block absmean, BitNet b1.58's rounding; int2 DequantizeLinear, opset 25). MatMul and
            Gemm weights only, block-wise along the input dimension (DequantizeLinear with block_size, opset 21);
            activations stay float.
        block_size: rows of the weight (input features) that share a scale in the weight-only mode; a power of two
            >= 16 lets onnxruntime fuse DequantizeLinear -> MatMul into its MatMulNBits kernel.
        algorithm: weight-only algorithm: "auto" (awq-gptq when calibration data is given, gptq with
            double_quant or gptq_sequential, else round to nearest; chosen by measurement on SmolLM2-135M,
            docs/benchmark-notes.md), "rtn" (round to nearest), "search"
            (per-block scale search minimising the weight error), "gptq" (GPTQ with the inputs' Gram matrices
            from the calibration data), "awq" (activation-aware input-channel scales from each input's mean |x|,
            searched by the output error, then a per-block clipping search), "awq-gptq" (those scales, then GPTQ).
        weight_only_head: the weight-only type of the output head (a MatMul/Gemm whose output is a graph output, a
            language model's lm_head): "int8" (block-wise, the default: a 4-bit head makes language models repeat
            themselves), "same" (the mode's type) or "float".
        weight_only_embeddings: the weight-only and dynamic modes also store embedding tables (a Gather of rows from a constant
            2-D float table) as int8, one scale per row; the rows are dequantized after the lookup.
        weight_only_tied: an int8 output head whose weight is the embedding table transposed (bit-exactly, or the
            table itself read through Transpose or Gemm transB=1): "once" (the head reads the embedding's int8
            rows and row scales, the table is stored once) or "separate" (the head gets its own block-wise int8
            copy).
        weight_only_mix: a mixed-precision preset of the weight-only mode, written into the plan as overrides (see
            the saved plan): "none", "k-mix" (int8 for the value and FFN down projections of the first eighth,
            the last eighth and every third layer between; roles found from the graph's structure) or "k-mix-o"
            (the attention output projections of those layers too).
        allow_contrib_ops: the weight-only mode writes onnxruntime's com.microsoft MatMulNBits (4/8-bit MatMul
            weights) and GatherBlockQuantized (int8 embedding rows) instead of standard DequantizeLinear forms;
            such a model runs on onnxruntime only.
        gptq_damp: GPTQ's dampening, a share of the Hessian's mean diagonal added to its diagonal.
        gptq_act_order: GPTQ quantizes input features in decreasing order of their Hessian diagonal.
        gptq_sequential: 0 takes every Hessian from the float model in one calibration pass; N > 0 measures them
            stage by stage with the weights before them already quantized: the MatMuls are ordered by how many
            planned MatMuls lie before them on the longest path (a transformer layer has 4 such stages), and each
            calibration pass measures N consecutive stages (one pass over the samples per N stages).
        double_quant: the weight-only block scales are stored as uint8 with one float32 scale per output channel
            (QLoRA's and GGUF's double quantization).
        double_quant_form: how the double-quantized scales are computed: "cast-mul" (Mul(Cast(codes), s2), which
            onnxruntime folds into a constant at load, so DequantizeLinear -> MatMul still fuses into MatMulNBits) or
            "dequantize" (DequantizeLinear(codes, s2), which onnxruntime does not fold: no MatMulNBits). Measured:
            docs/benchmark-notes.md.
        bias_correction: "off" or "empirical": after the Q/DQ pairs are inserted, each quantized Conv/ConvTranspose/
            Gemm bias (and a MatMul's bias Add) moves by the float model's per-channel output mean minus the
            quantized model's, measured on ``bias_correction_samples`` calibration samples, stage by stage in
            dependency order so each layer is measured with the layers before it corrected (a node without a bias
            gets one). Measured on the shared models: docs/benchmark-notes.md.
        bias_correction_samples: calibration samples the bias correction runs (evenly spaced over the data).
        bias_correction_stages: dependency stages corrected per pass over those samples (one pass measures
            the quantized model's means for that many consecutive stages; more is faster, fewer is closer to
            one layer at a time).
        smooth_quant: "on" migrates activation outliers into the weights before static 8-bit quantization
            (SmoothQuant): each MatMul/Gemm input the plan quantizes is divided by per-channel scales
            ``s_j = max|x_j|^a / max|W_j|^(1 - a)`` and the weights' input rows multiplied by them, the strength
            ``a`` of each layer searched on the calibration data by its output error with both quantized (``a = 0``,
            no migration, included); the smoothed model is then calibrated as usual (a second pass over the data).
            "off" (default). Measured: docs/benchmark-notes.md.
        smooth_alpha: a fixed SmoothQuant strength in (0, 1] instead of the per-layer search (each layer still
            keeps no migration where that scores better).
        target_cosine: an accuracy target (opt-in): when an output's mean cosine to fp32 on the validation split is
            below it after the rewrite, the precision search (qpass.search.precision) moves the compute nodes that
            the per-layer ranking says add the most error to 16-bit activations, then float, one move a step,
            rewriting from the same calibration table, until every output meets it or ``search_budget`` trials ran.
            None: no search.
        target_top1: the same with each output's top-1 agreement with fp32.
        search_budget: trials (one rewrite and validation each) the precision search may run at most.
        search_workers: processes scoring a step's candidate moves (1: in this process); the moves do not depend
            on it.
        search_16bit: a node's first move gives its activations 16-bit Q/DQ pairs (opset 21, the model upgraded
            for it), its next keeps it in float; False: float moves only.
        ray_address: run the search's trials as Ray tasks (the optional extra ``qpass[ray]``): a cluster address
            ("auto", "ray://host:port", "host:port") or "local" to start a Ray runtime on this machine. None: the
            process pool (``search_workers``). The trial results do not depend on it.
        objective: "accuracy" (default): the search only meets the accuracy target. "latency": also keeps float the
            compute nodes whose integer form measured slower than float (timing trials, medians of alternated
            runs; qpass.search.latency), so the output is not slower than the fp32 model, or the report says it
            could not.
        float_type: None, or "float16" / "bfloat16": convert the float part of the model to half precision (the
            float16 mode, qpass.half). Alone it converts a float model, or the float remainder of a quantized one
            (a qpass int8 QDQ or weight-only output); with ``weight_only`` the weight-only output is converted after
            its rewrite. With calibration data, a tensor whose measured |x| exceeds float16's range (or whose
            non-zero values would flush to zero in bulk) stays float32 with the nodes that read or write it.
        half_io: the model's float inputs and outputs become half too (default: they stay float32, with Casts).
        float_block_ops: op types that stay float32 in the float16 mode.
        float_keep_nodes: node names (or full-match regular expressions) that stay float32 in the float16 mode.
        float_min_cosine: the float16 mode's fidelity check: when an output's worst per-sample cosine to fp32 on
            the validation split is below it (or an output has inf/NaN), the nodes adding the most error move back
            to float32, a few at a time, for at most ``search_budget`` trials.
    """

    format: str = "qdq"
    method: str = "auto"
    range_choice: bool = True
    range_choice_margin_db: float = 3.0
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    equalize: bool | None = None
    quantize_outputs: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm")
    output_consumers: str = "all"
    activation_matmuls: bool = False
    neighbour_ops: tuple[str, ...] = NEIGHBOUR_OPS
    single_reader_dq: bool = True
    integer_hard_swish: str = "on"
    bias: str = "int32"
    percentile: float = 99.99
    bins: int = 2048
    kl_levels: int = 128
    hist_sample: int = 65536
    tensor_methods: dict = field(default_factory=dict)
    op_methods: dict = field(default_factory=dict)
    calib_batch_size: int = 1
    calib_overlap: bool = True
    calib_ep: str = "cpu"
    op_types: tuple[str, ...] = COMPUTE_OPS
    exclude_nodes: tuple[str, ...] = ()
    exclude_before: tuple[str, ...] = ()
    float_before_log: bool = True
    target_opset: int | None = None
    opset_upgrade: bool = True
    val_fraction: float = 0.2
    max_val_samples: int = 64
    max_calib_samples: int | None = None
    synthetic_calib: bool = False
    synthetic_samples: int = 8
    seed: int = 0
    min_cosine: float | None = None
    min_sqnr: float | None = None
    min_top1: float | None = None
    collapse_check: bool = True
    collapse_rescue: bool = True
    providers: tuple[str, ...] = ()
    validate: bool = True
    per_layer: bool = True
    latency: bool = True
    external_data: bool = False
    allow_empty: bool = False
    weight_only: str | None = None
    dynamic: bool = False
    block_size: int = 128
    algorithm: str = "auto"
    weight_only_head: str = "int8"
    weight_only_embeddings: bool = True
    weight_only_tied: str = "once"
    weight_only_mix: str = "none"
    allow_contrib_ops: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_sequential: int = 0
    double_quant: bool = False
    double_quant_form: str = "cast-mul"
    bias_correction: str = "off"
    bias_correction_samples: int = 8
    bias_correction_stages: int = 1
    smooth_quant: str = "off"
    smooth_alpha: float | None = None
    target_cosine: float | None = None
    target_top1: float | None = None
    search_budget: int = 8
    search_workers: int = 1
    search_16bit: bool = True
    ray_address: str | None = None
    objective: str = "accuracy"
    float_type: str | None = None
    half_io: bool = False
    float_block_ops: tuple[str, ...] = ()
    float_keep_nodes: tuple[str, ...] = ()
    float_min_cosine: float = 0.999
    _exclude_patterns: tuple[re.Pattern, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"invalid value {value!r}", subject=f"config '{name}'", hint=f"use {allowed}")

        if self.format not in FORMATS:
            raise bad("format", self.format, " or ".join(FORMATS))
        if self.method not in METHOD_CHOICES:
            raise bad("method", self.method, " or ".join(METHOD_CHOICES))
        if self.activation_type not in ACTIVATION_TYPES:
            raise bad("activation_type", self.activation_type, " or ".join(ACTIVATION_TYPES))
        if self.weight_only is not None and self.weight_only not in WEIGHT_ONLY_TYPES:
            raise bad("weight_only", self.weight_only, " or ".join(WEIGHT_ONLY_TYPES))
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise bad("block_size", self.block_size, "a positive integer (a power of two >= 16 for MatMulNBits)")
        if self.algorithm not in WEIGHT_ONLY_ALGORITHMS:
            raise bad("algorithm", self.algorithm, " or ".join(WEIGHT_ONLY_ALGORITHMS))
        if not (isinstance(self.gptq_damp, (int, float)) and 0.0 < float(self.gptq_damp) < 1.0):
            raise bad("gptq_damp", self.gptq_damp, "a number in (0, 1)")
        if self.weight_only_head not in ("int8", "same", "float"):
            raise bad("weight_only_head", self.weight_only_head, "int8, same or float")
        if not isinstance(self.weight_only_embeddings, bool):
            raise bad("weight_only_embeddings", self.weight_only_embeddings, "true or false")
        if self.weight_only_tied not in WEIGHT_ONLY_TIED:
            raise bad("weight_only_tied", self.weight_only_tied, " or ".join(WEIGHT_ONLY_TIED))
        if self.weight_only_mix not in WEIGHT_ONLY_MIXES:
            raise bad("weight_only_mix", self.weight_only_mix, " or ".join(WEIGHT_ONLY_MIXES))
        if not isinstance(self.allow_contrib_ops, bool):
            raise bad("allow_contrib_ops", self.allow_contrib_ops, "true or false")
        if not isinstance(self.gptq_sequential, int) or isinstance(self.gptq_sequential, bool) or self.gptq_sequential < 0:
            raise bad("gptq_sequential", self.gptq_sequential, "0 (float-model Hessians) or a positive stage count")
        if not isinstance(self.gptq_act_order, bool):
            raise bad("gptq_act_order", self.gptq_act_order, "true or false")
        if not isinstance(self.double_quant, bool):
            raise bad("double_quant", self.double_quant, "true or false")
        if self.double_quant_form not in ("cast-mul", "dequantize"):
            raise bad("double_quant_form", self.double_quant_form, "cast-mul or dequantize")
        if self.weight_only in NEAREST_ONLY_TYPES and self.algorithm not in ("auto", "rtn"):
            raise bad("algorithm", self.algorithm, f"auto or rtn with weight_only {self.weight_only} (nearest level only)")
        if self.double_quant and self.algorithm in ("awq", "awq-gptq"):
            raise bad("algorithm", self.algorithm, "rtn, search or gptq with double_quant (awq is not combined with it)")
        if not isinstance(self.dynamic, bool):
            raise bad("dynamic", self.dynamic, "true or false")
        if self.dynamic and self.weight_only is not None:
            raise bad("dynamic", self.dynamic, "false with weight_only (weight-only keeps activations float)")
        if self.dynamic and self.float_type is not None:
            raise bad("dynamic", self.dynamic, f"false with float_type {self.float_type} (run the float16 mode on "
                      "the dynamic output instead)")
        if self.weight_only is not None and self.format != "qdq":
            raise bad("format", self.format, "qdq with weight_only (the weights stay DequantizeLinear -> MatMul)")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise bad("bias_correction", self.bias_correction, " or ".join(BIAS_CORRECTIONS))
        for name in ("bias_correction_samples", "bias_correction_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, value, "a positive integer")
        if self.smooth_quant not in SMOOTH_QUANT:
            raise bad("smooth_quant", self.smooth_quant, " or ".join(SMOOTH_QUANT))
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool) or not isinstance(
                self.smooth_alpha, (int, float)) or not 0.0 < float(self.smooth_alpha) <= 1.0):
            raise bad("smooth_alpha", self.smooth_alpha, "a number in (0, 1], or none to search it per layer")
        for name in ("target_cosine", "target_top1"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (-1.0 if name == "target_cosine" else 0.0) <= float(value) <= 1.0):
                raise bad(name, value, "a number in [-1, 1]" if name == "target_cosine" else "a number in [0, 1]")
        for name in ("search_budget", "search_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, value, "a positive integer")
        if not isinstance(self.search_16bit, bool):
            raise bad("search_16bit", self.search_16bit, "true or false")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise bad("ray_address", self.ray_address, "a Ray address (auto, ray://host:port, host:port) or local")
        if self.objective not in OBJECTIVES:
            raise bad("objective", self.objective, " or ".join(OBJECTIVES))
        if self.float_type is not None and self.float_type not in FLOAT_TYPES:
            raise bad("float_type", self.float_type, " or ".join(FLOAT_TYPES) + " (or none)")
        if not isinstance(self.half_io, bool):
            raise bad("half_io", self.half_io, "true or false")
        for name in ("float_block_ops", "float_keep_nodes"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(x, str) and x for x in value):
                raise bad(name, value, "a list of names")
            object.__setattr__(self, name, tuple(value))
        for text in self.float_keep_nodes:
            try:
                re.compile(text)
            except re.error as exc:
                raise bad("float_keep_nodes", text, f"a node name or a valid regular expression ({exc})") from None
        if isinstance(self.float_min_cosine, bool) or not isinstance(self.float_min_cosine, (int, float)) or \
                not -1.0 <= float(self.float_min_cosine) <= 1.0:
            raise bad("float_min_cosine", self.float_min_cosine, "a number in [-1, 1]")
        if self.weight_type not in WEIGHT_TYPES:
            raise bad("weight_type", self.weight_type, " or ".join(WEIGHT_TYPES))
        for name, table in (("tensor_methods", self.tensor_methods), ("op_methods", self.op_methods)):
            if not isinstance(table, dict) or any(m not in METHODS for m in table.values()):
                raise bad(name, table, f"a table of name -> one of {list(METHODS)}")
        for key in self.op_methods:
            if key not in COMPUTE_OPS:
                raise bad("op_methods", key, f"an op type in {list(COMPUTE_OPS)}")
        for key in self.tensor_methods:
            try:
                re.compile(key)
            except re.error as exc:
                raise bad("tensor_methods", key, f"a tensor name or a valid regular expression ({exc})") from None
        if not (isinstance(self.percentile, (int, float)) and 50.0 < float(self.percentile) <= 100.0):
            raise bad("percentile", self.percentile, "a number in (50, 100]")
        if not isinstance(self.bins, int) or not 128 <= self.bins <= 2**20:
            raise bad("bins", self.bins, "an integer from 128 to 1048576")
        if not isinstance(self.kl_levels, int) or not 16 <= self.kl_levels <= self.bins:
            raise bad("kl_levels", self.kl_levels, "an integer from 16 to bins")
        if not isinstance(self.hist_sample, int) or isinstance(self.hist_sample, bool) or not (
                self.hist_sample == 0 or self.hist_sample >= 1024):
            raise bad("hist_sample", self.hist_sample, "0 (every value) or an integer of at least 1024")
        if not isinstance(self.calib_batch_size, int) or self.calib_batch_size < 1:
            raise bad("calib_batch_size", self.calib_batch_size, "a positive integer")
        if not isinstance(self.calib_overlap, bool):
            raise bad("calib_overlap", self.calib_overlap, "true or false")
        if self.bias not in ("int32", "float"):
            raise bad("bias", self.bias, "int32 or float")
        if self.bias == "float" and self.format != "qdq":
            raise bad("bias", self.bias, "int32 with format qop (QLinearConv takes an int32 bias)")
        if self.output_consumers not in ("all", "quantized"):
            raise bad("output_consumers", self.output_consumers, "all or quantized")
        if self.calib_ep not in CALIB_EPS:
            raise bad("calib_ep", self.calib_ep, " or ".join(CALIB_EPS))
        if not isinstance(self.single_reader_dq, bool):
            raise bad("single_reader_dq", self.single_reader_dq, "true or false")
        if self.integer_hard_swish not in INTEGER_HARD_SWISH:
            raise bad("integer_hard_swish", self.integer_hard_swish, " or ".join(INTEGER_HARD_SWISH))
        if not isinstance(self.validate, bool):
            raise bad("validate", self.validate, "true or false")
        if not isinstance(self.collapse_check, bool):
            raise bad("collapse_check", self.collapse_check, "true or false")
        if not isinstance(self.collapse_rescue, bool):
            raise bad("collapse_rescue", self.collapse_rescue, "true or false")
        if not isinstance(self.per_channel, bool):
            raise bad("per_channel", self.per_channel, "true or false")
        if self.equalize is not None and not isinstance(self.equalize, bool):
            raise bad("equalize", self.equalize, "true, false, or none (on with per-tensor weights)")
        ops = tuple(self.op_types)
        unknown = [op for op in ops if op not in COMPUTE_OPS]
        if unknown or not ops:
            raise bad("op_types", list(ops), f"a non-empty subset of {list(COMPUTE_OPS)}")
        object.__setattr__(self, "op_types", ops)
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if isinstance(self.exclude_before, str) or not all(isinstance(op, str) and op for op in self.exclude_before):
            raise bad("exclude_before", self.exclude_before, "a list of op types")
        object.__setattr__(self, "exclude_before", tuple(self.exclude_before))
        if not isinstance(self.opset_upgrade, bool):
            raise bad("opset_upgrade", self.opset_upgrade, "true or false")
        if not isinstance(self.range_choice, bool):
            raise bad("range_choice", self.range_choice, "true or false")
        if (isinstance(self.range_choice_margin_db, bool) or not isinstance(self.range_choice_margin_db, (int, float))
                or not math.isfinite(self.range_choice_margin_db) or self.range_choice_margin_db < 0):
            raise bad("range_choice_margin_db", self.range_choice_margin_db, "a number >= 0 (dB)")
        if not isinstance(self.float_before_log, bool):
            raise bad("float_before_log", self.float_before_log, "true or false")
        if isinstance(self.quantize_outputs, bool):
            object.__setattr__(self, "quantize_outputs", COMPUTE_OPS if self.quantize_outputs else ())
        object.__setattr__(self, "quantize_outputs", tuple(self.quantize_outputs))
        if isinstance(self.neighbour_ops, bool):
            object.__setattr__(self, "neighbour_ops", NEIGHBOUR_OPS if self.neighbour_ops else ())
        if isinstance(self.neighbour_ops, str):
            raise bad("neighbour_ops", self.neighbour_ops, f"a list, a subset of {list(NEIGHBOUR_OPS)}, or true/false")
        object.__setattr__(self, "neighbour_ops", tuple(self.neighbour_ops))
        if any(op not in NEIGHBOUR_OPS for op in self.neighbour_ops):
            raise bad("neighbour_ops", list(self.neighbour_ops), f"a subset of {list(NEIGHBOUR_OPS)}, or true/false")
        if any(op not in COMPUTE_OPS for op in self.quantize_outputs):
            raise bad("quantize_outputs", list(self.quantize_outputs), f"a subset of {list(COMPUTE_OPS)}, or true/false")
        patterns = []
        for text in self.exclude_nodes:
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise bad("exclude_nodes", text, f"a node name or a valid regular expression ({exc})") from None
        object.__setattr__(self, "_exclude_patterns", tuple(patterns))
        if self.target_opset is not None and not (
            isinstance(self.target_opset, int) and QDQ_MIN_OPSET <= self.target_opset <= 25
        ):
            raise bad("target_opset", self.target_opset, f"an integer from {QDQ_MIN_OPSET} to 25")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise bad("val_fraction", self.val_fraction, "a number in [0, 1)")
        if self.max_calib_samples is not None and (
            not isinstance(self.max_calib_samples, int) or self.max_calib_samples < 1
        ):
            raise bad("max_calib_samples", self.max_calib_samples, "a positive integer")
        if not isinstance(self.max_val_samples, int) or self.max_val_samples < 1:
            raise bad("max_val_samples", self.max_val_samples, "a positive integer")
        if not isinstance(self.synthetic_samples, int) or self.synthetic_samples < 1:
            raise bad("synthetic_samples", self.synthetic_samples, "a positive integer")
        if self.min_cosine is not None and not (-1.0 <= float(self.min_cosine) <= 1.0):
            raise bad("min_cosine", self.min_cosine, "a number in [-1, 1]")
        if self.min_top1 is not None and not (0.0 <= float(self.min_top1) <= 1.0):
            raise bad("min_top1", self.min_top1, "a number in [0, 1]")
        object.__setattr__(self, "providers", tuple(self.providers))
        if any(p not in ("cpu", "cuda") for p in self.providers):
            raise bad("providers", list(self.providers), "a list of cpu, cuda")

    # ------------------------------------------------------------------ helpers
    @property
    def activation_symmetric(self) -> bool:
        return self.activation_type in ("int8", "int16")

    def method_for(self, tensor: str, consumer_ops: set[str] | frozenset[str] = frozenset()) -> str:
        """The calibration method for one activation: by tensor name, then by consuming op type, then the default."""
        for key, method in self.tensor_methods.items():
            if key == tensor or re.fullmatch(key, tensor):
                return method
        for op in sorted(consumer_ops):
            if op in self.op_methods:
                return self.op_methods[op]
        if self.method == "auto":
            if self.activation_type in SIXTEEN_BIT_TYPES:
                return "minmax"
            return "percentile" if AUTO_PERCENTILE_OPS & set(consumer_ops) else "minmax"
        return self.method

    def is_excluded(self, node_name: str) -> bool:
        return any(p.fullmatch(node_name) for p in self._exclude_patterns)

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v)
                for f in dataclasses.fields(self) if not f.name.startswith("_")
                for v in [getattr(self, f.name)]}

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "QuantConfig":
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}", subject=source,
                              hint=f"known keys: {sorted(cls.field_names())}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "QuantConfig":
        """Load ``[qpass]`` (or top-level keys) from a TOML file; ``overrides`` win."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config file not found", subject=str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file ({exc})", subject=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", subject=str(path)) from None
        section = data.get("qpass", data)
        if not isinstance(section, dict):
            raise ConfigError("[qpass] must be a table", subject=str(path))
        section = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(section, source=str(path))
