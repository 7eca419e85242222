"""qpass: an ONNX post-training int8 quantizer that validates what it writes.

Public API: :func:`quantize`, :class:`QuantConfig`, :class:`Report`, :class:`QuantizeResult`, and the
error types in :mod:`qpass.errors`.
"""
__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .errors import QpassError  # noqa: E402
from .pipeline import QuantizeResult, quantize, validate_models  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["QpassError", "QuantConfig", "QuantizeResult", "Report", "__version__", "quantize", "validate_models"]
