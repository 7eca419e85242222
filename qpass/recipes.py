"""The pass list of each mode, literally: the only place that reads the configuration to decide which passes run.

Passes take their settings in their constructors; the pass context carries artifacts (plan, statistics).
"""
from __future__ import annotations

from .config import NEAREST_ONLY_TYPES, QuantConfig
from .pass_manager import Pass
from .passes.activation_scale import ActivationScale
from .passes.bias_correction import BiasCorrection
from .passes.cleanup import Cleanup
from .passes.constants_to_initializers import ConstantsToInitializers
from .passes.drop_duplicate_qdq import DropDuplicateQDQ
from .passes.contrib_gather_block_quantized import ContribGatherBlockQuantized
from .passes.contrib_matmul_nbits import ContribMatMulNBits
from .passes.convert_float16 import ConvertFloat16
from .passes.equalize_conv_chains import EqualizeConvChains
from .passes.fold_affine_into_conv import FoldAffineIntoConv
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_conv_affine import FoldConvAffine
from .passes.fold_fake_quant_weights import FoldFakeQuantWeights
from .passes.insert_dynamic import InsertDynamicQuantization
from .passes.insert_qdq import InsertQDQ
from .passes.integer_hard_swish import IntegerHardSwish
from .passes.lower_qop import LowerToQOperator
from .passes.matmul_bias_gemm import MatMulBiasToGemm
from .passes.merge_casts import MergeCasts
from .passes.qdq_params import CanonicalQDQParams
from .passes.repair_qdq_axis import RepairQDQAxis
from .passes.requantize_bias import RequantizeBias
from .passes.requantize_moved import RequantizeMoved
from .passes.rms_norm_divide import RmsNormDivide
from .passes.single_reader_dq import SingleReaderDequantize
from .passes.smooth_quant import SmoothQuant
from .passes.weight_only import WeightOnlyQuantize
from .passes.weight_only_codebook import WeightOnlyCodebook


#: configuration fields that only static quantization reads (set with --weight-only, they change nothing)
STATIC_ONLY = ("method", "activation_type", "per_channel", "bias", "percentile", "bins", "kl_levels", "tensor_methods",
               "op_methods", "activation_matmuls", "exclude_before", "quantize_outputs", "neighbour_ops", "equalize",
               "bias_correction", "smooth_quant", "smooth_alpha")
#: static-only fields that dynamic mode ignores too (it calibrates nothing); the weight fields still apply
DYNAMIC_IGNORES = tuple(f for f in STATIC_ONLY if f != "per_channel")


def resolve(config: QuantConfig, *, has_data: bool) -> tuple[QuantConfig, list[str]]:
    """The configuration with ``auto`` choices made for this run, and what to tell the user about them: the
    weight-only algorithm is activation-aware scaling then GPTQ (awq-gptq) when calibration data is given (plain GPTQ
    with double-quantized scales or sequential GPTQ, which awq does not combine with), round to nearest otherwise."""
    notes = []
    if config.weight_only:
        default = QuantConfig()
        static = [f for f in STATIC_ONLY if getattr(config, f) != getattr(default, f)]
        if static:
            notes.append(f"weight-only mode: {', '.join(static)} apply to static quantization and are ignored")
    if config.dynamic:
        default = QuantConfig()
        ignored = [f for f in DYNAMIC_IGNORES + ("format",) if getattr(config, f) != getattr(default, f)]
        if ignored:
            notes.append(f"dynamic mode: {', '.join(ignored)} apply to static quantization and are ignored")
    if config.smooth_quant == "on" and not config.weight_only and not config.dynamic and config.activation_type not in ("uint8", "int8"):
        notes.append(f"smooth_quant applies to 8-bit activations; with {config.activation_type} it is not applied")
    if config.weight_only and config.algorithm in ("awq", "awq-gptq") and config.gptq_sequential:
        notes.append(f"gptq_sequential applies to --algorithm gptq only; {config.algorithm} takes every Hessian from "
                     "the float model")
    if config.weight_only and config.algorithm == "auto":
        if has_data and config.weight_only not in NEAREST_ONLY_TYPES:
            plain = config.double_quant or config.gptq_sequential
            return config.replace(algorithm="gptq" if plain else "awq-gptq"), notes
        if config.weight_only in NEAREST_ONLY_TYPES:
            return config.replace(algorithm="rtn"), notes
        return config.replace(algorithm="rtn"), notes + [
            "weight-only without calibration data: round to nearest; give --calib for activation-aware scaling and "
            "GPTQ, which measured far closer to fp32 (SmolLM2-135M, docs/benchmark-notes.md)"]
    return config, notes


def prepare_passes(config: QuantConfig) -> list[Pass]:
    """Folds and constants to initializers, before planning: the graph the plan and calibration see; with
    ``equalize`` (static mode; by default with per-tensor weights), cross-layer equalization of Conv chains after the
    folds (it needs the folded weights)."""
    passes: list[Pass] = [ConstantsToInitializers(config.op_types), FoldBatchNorm(), FoldConvAffine(config.per_channel),
                          FoldAffineIntoConv()]
    equalize = (not config.per_channel) if config.equalize is None else config.equalize
    if equalize and not config.weight_only:
        passes.append(EqualizeConvChains())
    return passes + [Cleanup()]


def smooths(config: QuantConfig) -> bool:
    """Whether a run smooths activation outliers into the weights (SmoothQuant) before planning: static 8-bit
    activations with ``smooth_quant`` on."""
    return (config.smooth_quant == "on" and not config.weight_only and not config.dynamic
            and config.activation_type in ("uint8", "int8"))


def smooth_passes(config: QuantConfig) -> list[Pass]:
    """SmoothQuant's passes, on the prepared model (stages.smooth)."""
    return [SmoothQuant(alpha=config.smooth_alpha), Cleanup()]


def rewrite_passes(config: QuantConfig) -> list[Pass]:
    """The rewrite of the configured mode: weight-only (block-wise integer weights, activations float), or static
    int8/16 (Q/DQ pairs from the plan, then the output form: QDQ or integer operators)."""
    if config.weight_only:
        contrib = [ContribMatMulNBits(), ContribGatherBlockQuantized(), Cleanup()] if config.allow_contrib_ops else []
        settings = dict(damp=config.gptq_damp, act_order=config.gptq_act_order, tied=config.weight_only_tied)
        if config.weight_only in NEAREST_ONLY_TYPES or config.double_quant:
            quantize = WeightOnlyCodebook(config.algorithm, **settings, double_quant=config.double_quant,
                                          scale_form=config.double_quant_form)
        else:
            quantize = WeightOnlyQuantize(config.algorithm, **settings)
        if config.algorithm in ("awq", "awq-gptq"):
            return [ActivationScale(), quantize, Cleanup()] + contrib
        return [quantize, Cleanup()] + contrib
    # the activations the plan quantizes at run time (dynamic mode, or dynamic specs mixed into a static plan), then
    # static Q/DQ pairs; each rewrites its own part of the plan (qpass.plan.dynamic.dynamic_part)
    passes: list[Pass] = [InsertDynamicQuantization(), InsertQDQ(), Cleanup()]
    if config.bias_correction == "empirical" and not config.dynamic:  # run stage by stage on calibration samples (stages.correct_biases)
        passes += [BiasCorrection(config.bias)]
    if config.format == "qop" and not config.dynamic:
        passes += [LowerToQOperator(), Cleanup()]
    else:
        passes += [MatMulBiasToGemm()]
        if config.integer_hard_swish != "off":
            passes += [IntegerHardSwish(offsets=config.integer_hard_swish == "offsets")]
    if config.single_reader_dq:
        passes += [SingleReaderDequantize()]
    return passes


def float_passes(config: QuantConfig, *, keep_tensors: frozenset[str] = frozenset(),
                 keep_nodes: tuple[str, ...] = ()) -> list:
    """The float16/bfloat16 mode's model-level passes (``apply(model) -> (model, PassResult)``): convert the float
    part to ``config.float_type`` keeping ``keep_tensors`` (measured out of range, or moved back by the fidelity
    check) and ``keep_nodes`` in float32, then merge the Cast chains the boundaries leave. RMS normalizations are
    first written as a division, the form whose float32 statistics onnxruntime fuses into one kernel."""
    return [RmsNormDivide(),
            ConvertFloat16(config.float_type or "float16", half_io=config.half_io, block_ops=config.float_block_ops,
                           keep_nodes=keep_nodes, keep_tensors=keep_tensors), MergeCasts()]


def import_repair_passes(config: QuantConfig) -> list[Pass]:
    """QDQ import, first step: what makes an imported model valid (constants as initializers, Q/DQ parameters
    as scalar constants, Q/DQ axes repaired or refused). Its result is what the run validates against when no float reference is given."""
    return [ConstantsToInitializers(config.op_types), CanonicalQDQParams(), RepairQDQAxis(), Cleanup()]


def import_passes(config: QuantConfig) -> list[Pass]:
    """QDQ import, second step: the imported model in qpass's QDQ form (duplicated pairs dropped, fake-quantized weights folded to integers, biases int32 at s_x * s_w, compute nodes
    behind data movement given their input's pair)."""
    return [DropDuplicateQDQ(), FoldFakeQuantWeights(), RequantizeMoved(), RequantizeBias(),
            Cleanup()]


def lower_passes(config: QuantConfig) -> list[Pass]:
    """QDQ import, last step: integer operators with ``--format qop``; nothing with QDQ."""
    return [LowerToQOperator(), Cleanup()] if config.format == "qop" else []
