"""The quantization plan: which tensors and nodes get which precision (spec), as data; placement and targets decide it."""
