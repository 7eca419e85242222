"""The Report of one run: what was quantized, what was skipped and why, timings, sizes, validation; JSON on disk."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pass_manager import PassRecord

SCHEMA_VERSION = 1


@dataclass
class Report:
    model: str
    output: str | None = None
    config: dict = field(default_factory=dict)
    opset: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    validation: dict | None = None
    warnings: list[str] = field(default_factory=list)
    #: the quantization plan the rewrite applied (QuantPlan.to_dict), overrides folded in where they were given
    plan: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: the precision search's target, moves and trials (qpass.search.precision), the latency objective's under
    #: "latency" (qpass.search.latency); None when neither ran
    search: dict | None = None

    @property
    def skipped(self) -> list[dict]:
        return [s.to_dict() for r in self.passes for s in r.skipped]

    @property
    def synthetic_calibration(self) -> bool:
        return bool(self.calibration.get("synthetic"))

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "qpass_version": __version__,
            "model": self.model,
            "output": self.output,
            "synthetic_calibration": self.synthetic_calibration,
            "config": self.config,
            "opset": self.opset,
            "calibration": self.calibration,
            "quantized_nodes": self.quantized_nodes,
            "quantized_total": sum(self.quantized_nodes.values()),
            "skipped": self.skipped,
            "passes": [r.to_dict() for r in self.passes],
            "sizes": self.sizes,
            "validation": self.validation,
            "warnings": self.warnings,
            "plan": self.plan,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            **({"search": self.search} if self.search is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def save(self, path: str | Path) -> Path:
        """Write the JSON report, and the HTML page beside it (same name, ``.html``)."""
        from ..io import write_text_atomic
        from .html import render_html

        path = Path(path)
        write_text_atomic(path.with_suffix(".html"), render_html(self.to_dict()))
        return write_text_atomic(path, self.to_json() + "\n")


def count_quantized(records: list[PassRecord]) -> dict[str, int]:
    """Quantized compute nodes per op type: the stats of the passes whose role is "quantize"."""
    total: Counter = Counter()
    for r in records:
        if r.role == "quantize":
            total.update(r.stats)
    return dict(total)
