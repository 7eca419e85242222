"""Weight quantizers, pure numpy functions of (weight, statistics, spec): round to nearest, a per-block scale
search, GPTQ. Each returns the integer weight with its scale and zero point in the ONNX layout."""
