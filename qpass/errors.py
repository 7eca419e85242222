"""Typed errors: every user-facing failure names the file, node or tensor and says what to do.

The CLI maps :class:`QpassError` (and its children) to exit code 2 with a one-line message;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class QpassError(Exception):
    """Base class of all errors qpass raises on purpose.

    ``subject`` names what is wrong (a file, node or tensor), ``hint`` says what to do.
    """

    exit_code = 2

    def __init__(self, message: str, *, subject: str | None = None, hint: str | None = None):
        self.message = message
        self.subject = subject
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.subject}: {self.message}" if self.subject else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class ModelLoadError(QpassError):
    """The model file is missing, unreadable, not ONNX or invalid."""


class ModelSaveError(QpassError):
    """The output cannot be written where asked (including: it is the input path)."""


class ConfigError(QpassError):
    """A configuration value or config file is invalid."""


class PlanError(QpassError):
    """A quantization plan (file or object) is malformed or does not fit the model."""


class OpsetError(QpassError):
    """The model's opset does not allow what was asked; never changed silently."""


class CalibrationDataError(QpassError):
    """Calibration or validation data does not fit the model (name, dtype, rank, values)."""


class UnsupportedModelError(QpassError):
    """The model uses something qpass refuses to quantize (for example it is already quantized)."""


class NothingQuantizedError(QpassError):
    """The pipeline found nothing to quantize."""


class PreconditionError(QpassError):
    """A pass's requirements on its input graph are not met."""


class PostconditionError(QpassError):
    """A pass left its output graph in a state it promised not to."""


class VerificationError(QpassError):
    """The structural verifier found an invalid graph."""


class PassError(QpassError):
    """A pass failed; the message names it and the passes that ran before it.

    This is an internal failure (a bug in qpass or a model it cannot handle), so it is
    reported with exit code 2 and the chained cause is kept for ``--debug``.
    """


class ValidationFailed(QpassError):
    """The quantized model did not meet the requested tolerance."""

    exit_code = 1


class DependencyError(QpassError):
    """An optional dependency that the asked feature needs is not installed or cannot be reached (Ray for --ray)."""
