"""Calibration: data readers, streaming range collection, observers and the CalibrationTable.

Never imports :mod:`qpass.passes`; the table is the only thing that crosses over.
"""
from .data import InputSpec, SampleSource, input_specs, open_samples, synthetic_samples
from .table import CalibrationTable, TensorRange

__all__ = ["CalibrationTable", "InputSpec", "SampleSource", "TensorRange", "input_specs", "open_samples",
           "synthetic_samples"]
