"""SmolLM2-135M in a smaller form for copying to the GPU machine (transfers of at most 64 MiB), and back.

    python -m benchmarks.smollm2_transfer pack KIT OUT.onnx      # drops lm_head.weight_T (the embedding transposed)
    python -m benchmarks.smollm2_transfer unpack IN.onnx KIT_MODEL.onnx   # restores it from the embedding

The kit's fp32 model holds its tied head twice (``model.embed_tokens.weight`` and its transpose
``lm_head.weight_T``, 113 MB); pack checks they are equal and writes the model without the transpose, unpack
writes it back. The result is byte-for-byte the same set of weights (unpack checks the shapes).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight_T"


def pack(kit: Path, out: Path) -> None:
    m = onnx.load(str(kit / "smollm2_135m.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    if not np.array_equal(numpy_helper.to_array(inits[EMBED]).T, numpy_helper.to_array(inits[HEAD])):
        raise SystemExit(f"{HEAD} is not {EMBED} transposed: not packable")
    keep = [t for t in m.graph.initializer if t.name != HEAD]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, str(out))


def unpack(src: Path, out: Path) -> None:
    m = onnx.load(str(src))
    embed = next(t for t in m.graph.initializer if t.name == EMBED)
    head = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(embed).T), HEAD)
    m.graph.initializer.append(head)
    onnx.checker.check_model(m, full_check=False) if m.ByteSize() < 2**31 else None
    onnx.save(m, str(out))


if __name__ == "__main__":
    cmd, a, b = sys.argv[1:4]
    (pack if cmd == "pack" else unpack)(Path(a).expanduser(), Path(b))
