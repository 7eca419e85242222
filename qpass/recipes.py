"""The pass list of each mode, literally: the only place that reads the configuration to decide which passes run.

Passes take their settings in their constructors; the pass context carries artifacts (plan, statistics).
"""
from __future__ import annotations

from .config import QuantConfig
from .pass_manager import Pass
from .passes.cleanup import Cleanup
from .passes.constants_to_initializers import ConstantsToInitializers
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_conv_bias_add import FoldConvBiasAdd
from .passes.insert_qdq import InsertQDQ
from .passes.lower_qop import LowerToQOperator
from .passes.matmul_bias_gemm import MatMulBiasToGemm
from .passes.single_reader_dq import SingleReaderDequantize
from .passes.weight_only import WeightOnlyQuantize


def prepare_passes(config: QuantConfig) -> list[Pass]:
    """Folds and constants to initializers, before planning: the graph the plan and calibration see."""
    return [ConstantsToInitializers(config.op_types), FoldBatchNorm(), FoldConvBiasAdd(), Cleanup()]


def rewrite_passes(config: QuantConfig) -> list[Pass]:
    """The rewrite of the configured mode: weight-only (block-wise integer weights, activations float), or static
    int8/16 (Q/DQ pairs from the plan, then the output form: QDQ or integer operators)."""
    if config.weight_only:
        return [WeightOnlyQuantize(config.algorithm, damp=config.gptq_damp, act_order=config.gptq_act_order), Cleanup()]
    passes: list[Pass] = [InsertQDQ(), Cleanup()]
    if config.format == "qop":
        passes += [LowerToQOperator(), Cleanup()]
    else:
        passes += [MatMulBiasToGemm()]
    if config.single_reader_dq:
        passes += [SingleReaderDequantize()]
    return passes
