"""Which samples calibrate and which validate: the user's data, a held-out split of it, or random feeds (loudly)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ..config import QuantConfig
from ..errors import CalibrationDataError
from .data import InputSpec, open_samples, split_holdout, synthetic_samples


SYNTHETIC_WARNING = ("CALIBRATION USED RANDOM DATA (--synthetic-calib): the ranges, and the accuracy of this model, "
                     "mean nothing for real inputs")


@dataclass
class CalibrationData:
    """The calibration stream ((feed, label) pairs, read once), its size where known, and the samples held out of it."""

    stream: Iterable
    total: int | None
    description: str
    synthetic: bool = False
    held: list = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def take(it: Iterable, n: int) -> Iterator:
    """The first ``n`` items of ``it``."""
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def keep_spread(stream: Iterable, n: int, total: int | None) -> tuple[Iterator, list]:
    """Stream ``stream`` unchanged while keeping ``n`` of its items in the returned list: evenly spaced over its
    ``total`` items when that is known, else the first ``n``. The list fills as the iterator is consumed."""
    kept: list = []
    picks = None
    if total:
        count = min(n, total)
        picks = {round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}

    def gen() -> Iterator:
        for i, item in enumerate(stream):
            if (i in picks) if picks is not None else i < n:
                kept.append(item)
            yield item

    return gen(), kept


def calibration_data(calib: Any, specs: list[InputSpec], config: QuantConfig, *, val_given: bool,
                     subject: str = "model") -> CalibrationData:
    """Open ``calib`` (or random feeds with ``synthetic_calib``), hold out a validation split unless ``val_given``,
    and cap it at ``max_calib_samples``."""
    warnings = []
    if calib is None:
        if not config.synthetic_calib:
            raise CalibrationDataError("no calibration data given", subject=subject,
                                       hint="pass --calib PATH (or --synthetic-calib for a smoke run on random data)")
        samples: Any = [(f, None) for f in synthetic_samples(specs, config.synthetic_samples, config.seed)]
        warnings.append(SYNTHETIC_WARNING)
        description, total = "synthetic", len(samples)
    else:
        samples = open_samples(calib, specs)
        description, total = samples.description, len(samples) or None
    stream: Iterable = samples
    held: list = []
    if not val_given and config.val_fraction > 0:
        stream, held = split_holdout(samples, config.val_fraction, config.max_val_samples)
        if total:
            total = total - min(config.max_val_samples, total // max(2, round(1 / config.val_fraction)))
    if config.max_calib_samples is not None:
        stream = take(stream, config.max_calib_samples)
        total = min(total, config.max_calib_samples) if total else config.max_calib_samples
    return CalibrationData(stream, total, description, calib is None, held,
                           sorted(getattr(samples, "ignored_keys", set())), warnings)


def validation_data(val: Any, specs: list[InputSpec], config: QuantConfig, *, calib: Any = None,
                    held: list | None = None, loaded_table: bool = False,
                    calibrated: bool = True) -> tuple[Iterable | None, str | None]:
    """The validation samples and their description: ``val``; else random feeds when calibration was random too;
    else the held-out split; else the first samples of ``calib`` when no calibration read it (a loaded table,
    whose data is unknown, or a plan that needs no data)."""
    if val is not None:
        samples = open_samples(val, specs, what="validation data")
        return samples, samples.description
    if calib is None and not loaded_table:
        return [(f, None) for f in synthetic_samples(specs, config.synthetic_samples, config.seed + 1)], "synthetic"
    if held:
        return held, f"{len(held)} held-out calibration samples"
    if calib is not None and (loaded_table or not calibrated):
        why = "the loaded table's data is unknown" if loaded_table else "the plan needed no calibration"
        return take(open_samples(calib, specs), config.max_val_samples), \
            f"up to {config.max_val_samples} samples of {calib} ({why})"
    return None, None
