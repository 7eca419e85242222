"""qpass: an ONNX post-training quantizer that validates what it writes.

Public API: :func:`quantize` and :func:`validate_models`; the stages they call, one at a time
(:mod:`qpass.stages`: ``load``, ``prepare``, ``plan``, ``calibrate``, ``load_calibration``, ``rewrite``,
``evaluate``); the plan as data (:class:`QuantPlan`, :class:`QSpec`); :class:`QuantConfig`, :class:`Report`,
:class:`QuantizeResult`, :class:`CalibrationTable`, and the error types in :mod:`qpass.errors`.
"""
__version__ = "0.1.0"

from . import stages  # noqa: E402
from .api import QuantizeResult, quantize, validate_models  # noqa: E402
from .calib.table import CalibrationTable  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import QpassError  # noqa: E402
from .plan.spec import Override, QSpec, QuantPlan  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["CalibrationTable", "Override", "QSpec", "QpassError", "QuantConfig", "QuantPlan", "QuantizeResult", "Report",
           "__version__", "quantize", "stages", "validate_models"]
