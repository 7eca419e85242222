"""Op knowledge in one table: which ops qpass quantizes, their weight/bias slots and channel axes, data movement,
joins, range-folding activations, the integer kernels of the standard opset, and the opset each feature needs.

Planning (:mod:`qpass.plan`), the passes and the configuration read these. Op lists that belong to one
consumer's own judgement stay with it: which float readers onnxruntime fuses (single_reader_dq.FLOAT_READERS),
which nodes the per-layer ranking skips (evaluate/validate.py).
"""
from __future__ import annotations

# ------------------------------------------------------------------ compute ops and their inputs
#: ops whose weights and activations static quantization rewrites
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: input slots that may hold a constant weight or bias (MatMul: either operand may be the constant)
WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (0, 1), "Gemm": (1, 2)}
#: ops whose third input is a bias added per output channel
BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: output-channel axis of the weight where it is fixed (Gemm's follows transB; MatMul's is B's last axis)
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1}
#: recurrent ops: not quantized, and reported as such
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})

# ------------------------------------------------------------------ what an activation's Q/DQ can pass through
#: ops that move or select values without changing them: their output may share their input's scale
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
                           "Slice", "Gather", "Resize", "SpaceToDepth", "DepthToSpace", "Expand", "Tile"})
#: ops that keep a small value small on the way to a Log (data movement, linear ops, products, sums, magnitudes,
#: lower clamps): a compute node reaching a Log through these only computes a quantity the Log reads
#: (config.float_before_log)
LOG_PATH_OPS = DATA_MOVEMENT | frozenset({"Pad", "Concat", "Split", "Neg", "Abs", "Mul", "Add", "Sub", "Div", "Sqrt",
                                          "Pow", "ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceL1", "ReduceL2",
                                          "Clip", "Max", "Cast"})
#: activations that only clip the producer's range: quantizing their output keeps the range tight
RANGE_FOLDING = frozenset({"Relu", "Clip"})
#: joins and pooling that run on integers when all their inputs are quantized (config.neighbour_ops)
NEIGHBOUR_OPS = ("Add", "Concat", "AveragePool", "GlobalAveragePool")

# ------------------------------------------------------------------ quantized forms
#: standard and contrib quantization ops: a model holding any of them is already quantized
QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QAttention", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax",
})
#: integer operators of the standard opset that --format qop writes, by the float op they replace
INTEGER_KERNELS = {"Conv": ("QLinearConv", "ConvInteger"), "MatMul": ("QLinearMatMul", "MatMulInteger"),
                   "Gemm": ("MatMulInteger",)}

# ------------------------------------------------------------------ opset minima
#: QuantizeLinear / DequantizeLinear at all
QDQ_MIN_OPSET = 10
#: the ``axis`` attribute of DequantizeLinear (per-channel scales)
PER_CHANNEL_MIN_OPSET = 13
#: 16-bit integers in QuantizeLinear / DequantizeLinear
INT16_MIN_OPSET = 21
#: int4/uint4 values and the ``block_size`` attribute (block-wise scales)
BLOCKED_MIN_OPSET = 21
#: int2 values in DequantizeLinear (ternary weights)
INT2_MIN_OPSET = 25

# ------------------------------------------------------------------ bfloat16 kernels of the runtime
#: standard ops onnxruntime's CUDA provider runs in bfloat16, with the first opset whose kernel takes it (its CPU
#: provider has almost none): read from onnxruntime's docs/OperatorKernels.md (CUDAExecutionProvider, ai.onnx rows)
#: at main a0cc0847 (2025-10-08, 1.23.0 in development); the kernels of 1.20 are all there, 1.25 adds Attention.
#: The bfloat16 mode converts other ops' nodes only where this says a kernel exists, since a node without one
#: makes the whole session fail to load (onnxruntime-gpu 1.31.1 on an H200: BatchNormalization, Pad, Reciprocal,
#: ReduceL2 stopped every shared model). Not here, among others: BatchNormalization, InstanceNormalization, Pad,
#: Resize, ConvTranspose, MaxPool, GlobalAveragePool, Reciprocal, Log, Clip, LeakyRelu, PRelu, ReduceMean/Max/L2,
#: LSTM, GRU, Einsum, TopK.
CUDA_BFLOAT16_FROM = {
    **dict.fromkeys(("Cast", "Compress", "Concat", "ConstantOfShape", "Expand", "Flatten", "Gather", "GatherElements",
                     "Identity", "If", "LayerNormalization", "Loop", "Max", "Min", "Reshape", "ReverseSequence",
                     "Scan", "Scatter", "ScatterElements", "ScatterND", "SequenceAt", "SequenceConstruct", "Shape",
                     "Size", "Slice", "Split", "Squeeze", "Sum", "Transpose", "Unsqueeze", "RandomNormalLike",
                     "RandomUniformLike"), 1),
    **dict.fromkeys(("Abs", "Add", "Div", "Dropout", "Erf", "Exp", "GatherND", "Gemm", "IsNaN", "MatMul", "Mod", "Mul",
                     "Neg", "Pow", "ReduceSum", "Relu", "Sigmoid", "Sign", "Softmax", "Sqrt", "Sub", "Tanh", "Tile"), 13),
    "Trilu": 14, "Where": 16, "Gelu": 20, "IsInf": 20,
    **dict.fromkeys(("Conv", "AveragePool", "HardSigmoid", "HardSwish"), 22),
    **dict.fromkeys(("RMSNormalization", "RotaryEmbedding"), 23),
}
