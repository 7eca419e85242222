"""CalibrationTable: tensor name -> observed range, JSON-serialisable so runs can be reproduced."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import CalibrationDataError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorRange:
    min: float
    max: float
    method: str = "minmax"
    samples: int = 0
    observed_min: float | None = None
    observed_max: float | None = None

    def to_dict(self) -> dict:
        d = {"min": self.min, "max": self.max, "method": self.method, "samples": self.samples}
        if self.observed_min is not None:
            d["observed_min"], d["observed_max"] = self.observed_min, self.observed_max
        return d


def _opt(x) -> float | None:
    return None if x is None else float(x)


class CalibrationTable:
    def __init__(self, ranges: dict[str, TensorRange] | None = None, *, samples: int = 0, synthetic: bool = False):
        self.ranges: dict[str, TensorRange] = dict(ranges or {})
        self.samples = samples
        self.synthetic = synthetic

    def get(self, name: str) -> TensorRange | None:
        return self.ranges.get(name)

    def __len__(self) -> int:
        return len(self.ranges)

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def to_json(self) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, "samples": self.samples, "synthetic": self.synthetic,
                           "ranges": {k: v.to_dict() for k, v in self.ranges.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "calibration table") -> "CalibrationTable":
        try:
            data = json.loads(text)
            ranges = {k: TensorRange(float(v["min"]), float(v["max"]), str(v.get("method", "minmax")),
                                     int(v.get("samples", 0)), _opt(v.get("observed_min")), _opt(v.get("observed_max")))
                      for k, v in data["ranges"].items()}
            samples = int(data.get("samples", 0))
            synthetic = bool(data.get("synthetic", False))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationDataError(f"not a qpass calibration table ({exc})", subject=source) from None
        for name, r in ranges.items():
            if not (math.isfinite(r.min) and math.isfinite(r.max) and r.min <= r.max):
                raise CalibrationDataError(f"tensor '{name}' has an invalid range [{r.min}, {r.max}]", subject=source,
                                           hint="ranges must be finite with min <= max")
        return cls(ranges, samples=samples, synthetic=synthetic)

    def save(self, path: str | Path) -> None:
        from ..io import write_text_atomic

        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationDataError(f"cannot read ({exc})", subject=str(path)) from None
        return cls.from_json(text, source=str(path))
