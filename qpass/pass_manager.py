"""The pass contract (requires -> run -> ensures) and the manager that verifies after every pass."""
from __future__ import annotations

import abc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import onnx
import onnx_graphsurgeon as gs

from .errors import PassError, QpassError, VerificationError

if TYPE_CHECKING:
    from .calib.table import CalibrationTable
    from .plan.spec import QuantPlan


@dataclass(frozen=True)
class Skip:
    """A candidate a pass left alone, and why (shown in the report, never silent)."""

    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


@dataclass(frozen=True)
class PassResult:
    modified: bool
    skipped: tuple[Skip, ...] = ()
    #: counts of what the pass did, e.g. {"Conv": 3}; free-form, for the report
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """The artifacts passes read (settings go to each pass's constructor)."""

    plan: "QuantPlan | None" = None
    calib: "CalibrationTable | None" = None


class Pass(abc.ABC):
    """One graph rewrite. ``run`` mutates the graph in place and says whether it changed it."""

    #: "quantize" for the pass whose stats count the quantized compute nodes (the report sums those); else "rewrite"
    role = "rewrite"

    @property
    def name(self) -> str:
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(self).__name__).lower()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PreconditionError` (naming the node) if the input graph is unfit."""

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PostconditionError` if the output graph breaks a promise of this pass."""


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    modified: bool
    skipped: tuple[Skip, ...]
    stats: dict
    role: str = "rewrite"

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 4), "modified": self.modified,
                "skipped": [s.to_dict() for s in self.skipped], "stats": self.stats}


Exporter = Callable[[gs.Graph], onnx.ModelProto]


def run_model_passes(model: onnx.ModelProto, passes: Sequence, *, verify: Callable[[onnx.ModelProto], None]
                     ) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run model-level passes (``apply(model) -> (model, PassResult)``, on the ModelProto itself, in place) in
    order, verifying after each: a failure names the pass. Returns the model and the pass records."""
    records = []
    for p in passes:
        t = time.perf_counter()
        model, result = p.apply(model)
        try:
            verify(model)
        except VerificationError as exc:
            raise VerificationError(f"after pass '{p.name}': {exc.message}", subject=exc.subject, hint=exc.hint) from exc
        records.append(PassRecord(p.name, time.perf_counter() - t, result.modified, tuple(result.skipped),
                                  dict(result.stats), p.role))
    return model, records


class PassManager:
    """Runs a literal list of passes: requires -> run -> ensures -> verify, timing each.

    ``export`` turns the working graph into a ModelProto (restoring model metadata) and
    ``verify`` checks it structurally; on any failure a :class:`PassError` names the failing pass
    and the ones before it, and with ``dump_dir`` the model as it was just before that pass is
    written there.
    """

    def __init__(self, passes: Sequence[Pass], *, export: Exporter, verify: Callable[[onnx.ModelProto], None] | None,
                 dump_dir: str | Path | None = None):
        self.passes = list(passes)
        self.export = export
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        #: the graph as exported after the last pass that changed it (None when none did): callers reuse it
        #: instead of exporting the unchanged graph again (an export copies every weight)
        self.last_export: onnx.ModelProto | None = None

    def run(self, graph: gs.Graph, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        before = self.export(graph) if self.dump_dir is not None else None
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.requires(graph, ctx)
                result = p.run(graph, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass {p.name} returned {type(result).__name__}, not PassResult")
                p.ensures(graph, ctx)
                # an unchanged graph was verified after the pass before it (or on import): exporting and checking it
                # again costs seconds on a large model and finds nothing new
                after = before
                if result.modified and (self.verify is not None or self.dump_dir is not None):
                    if self.dump_dir is None:  # the last export is kept for a dump only: free it before the next
                        before = after = self.last_export = None
                    after = self.export(graph)
                    if self.verify is not None:
                        self.verify(after)
            except Exception as exc:  # noqa: BLE001 - re-raised with the pass named
                ran = [r.name for r in records]
                dumped = self._dump(before, p.name)
                detail = exc.one_line() if isinstance(exc, QpassError) else f"{type(exc).__name__}: {exc}"
                msg = f"pass '{p.name}' failed after {ran}: {detail}"
                hint = f"the model before this pass is in {dumped}" if dumped else "rerun with --dump-dir DIR to keep the model from before this pass"
                raise PassError(msg, hint=hint) from exc
            records.append(PassRecord(p.name, time.perf_counter() - start, result.modified, tuple(result.skipped),
                                      dict(result.stats), p.role))
            if result.modified:  # exported just now, or (nothing asked for an export) not at all
                self.last_export = after if after is not before else None
            before = after
        return records

    def _dump(self, model: onnx.ModelProto | None, pass_name: str) -> Path | None:
        if self.dump_dir is None or model is None:
            return None
        from .io import save_model

        self.dump_dir.mkdir(parents=True, exist_ok=True)
        return save_model(model, self.dump_dir / f"before_{pass_name}.onnx")
