"""Calibration: data readers, streaming collection, observers and the statistics / calibration tables.

Never imports :mod:`qpass.passes`; the table is the only thing that crosses over.
"""
from .collect import collect_ranges
from .data import InputSpec, SampleSource, input_specs, open_samples, synthetic_samples
from .observers import (AbsMeanObserver, GramObserver, MinMaxObserver, Observer, RangeOptions, make_observer,
                        register_observer)
from .stats import AbsMean, Gram, Statistics, TensorRange, register_statistic
from .table import CalibrationTable

__all__ = ["AbsMean", "AbsMeanObserver", "CalibrationTable", "Gram", "GramObserver", "InputSpec", "MinMaxObserver",
           "Observer", "RangeOptions", "SampleSource", "Statistics", "TensorRange", "collect_ranges", "input_specs",
           "make_observer", "open_samples", "register_observer", "register_statistic", "synthetic_samples"]
