"""The opset policy: never changed silently; upgraded with onnx.version_converter only when asked, and only when the
model's interface survives the upgrade."""
from __future__ import annotations

import onnx

from .config import SIXTEEN_BIT_TYPES, QuantConfig
from .errors import OpsetError
from .io import default_opset, min_ir_version
from .ops import BLOCKED_MIN_OPSET, INT2_MIN_OPSET, INT16_MIN_OPSET, PER_CHANNEL_MIN_OPSET, QDQ_MIN_OPSET


def interface(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Graph inputs (not initializers) and outputs: name -> (value kind, element type, dims or None)."""
    inits = {t.name for t in model.graph.initializer}

    def sig(vi: onnx.ValueInfoProto) -> tuple:
        t = vi.type
        if t.HasField("tensor_type"):
            tt = t.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim] if tt.HasField("shape") else None
            return ("tensor", onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "?", dims)
        return (t.WhichOneof("value"), None, None)

    return ({vi.name: sig(vi) for vi in model.graph.input if vi.name not in inits},
            {vi.name: sig(vi) for vi in model.graph.output})


def interface_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """How the inputs and outputs of ``after`` differ from those of ``before`` (empty when they do not)."""
    changes = []
    for what, old, new in zip(("input", "output"), interface(before), interface(after)):
        if list(old) != list(new):
            changes.append(f"{what}s {list(old)} became {list(new)}")
            continue
        for n, (o, a) in ((n, (old[n], new[n])) for n in old):
            if o[:2] != a[:2] or (o[2] is not None and a[2] is not None and o[2] != a[2]):
                changes.append(f"{what} '{n}' {o[1]}{o[2]} became {a[1]}{a[2]}")
    return changes


def apply_opset_policy(model: onnx.ModelProto, cfg: QuantConfig, name: str) -> tuple[onnx.ModelProto, dict, list[str]]:
    """The model at the opset the run needs (upgraded only when ``target_opset`` asks), the opsets in and out, and
    warnings; an opset too low for what the configuration asks raises :class:`OpsetError` naming the fix."""
    opset = default_opset(model)
    info = {"input": opset, "output": opset}
    hint_up = f"rerun with --target-opset {PER_CHANNEL_MIN_OPSET} to upgrade it with onnx.version_converter"
    final = cfg.target_opset or opset
    if cfg.weight_only and final < BLOCKED_MIN_OPSET:
        raise OpsetError(f"weight-only {cfg.weight_only} writes block-wise DequantizeLinear, which needs opset "
                         f"{BLOCKED_MIN_OPSET}; the model would have {final}", subject=name,
                         hint=f"use --target-opset {BLOCKED_MIN_OPSET} (onnx.version_converter)")
    if cfg.weight_only == "ternary" and final < INT2_MIN_OPSET:
        raise OpsetError(f"weight-only ternary writes int2 DequantizeLinear, which needs opset {INT2_MIN_OPSET}; the "
                         f"model would have {final}", subject=name, hint=f"use --target-opset {INT2_MIN_OPSET}")
    if cfg.activation_type in SIXTEEN_BIT_TYPES and final < INT16_MIN_OPSET:
        raise OpsetError(f"{cfg.activation_type} activations need QuantizeLinear from opset {INT16_MIN_OPSET}; "
                         f"the model would have {final}", subject=name,
                         hint=f"use --target-opset {INT16_MIN_OPSET} or an 8-bit --activation-type")
    if cfg.target_opset is not None:
        if cfg.target_opset < opset:
            raise OpsetError(f"model has opset {opset}; downgrading to {cfg.target_opset} is not supported",
                             subject=name, hint=f"use --target-opset {opset} or higher, or leave it out")
        if cfg.target_opset > opset:
            from onnx import version_converter

            try:
                converted = version_converter.convert_version(model, cfg.target_opset)
                converted.ir_version = max(converted.ir_version, min_ir_version(converted))
                onnx.checker.check_model(converted, full_check=True)
            except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
                raise OpsetError(f"onnx.version_converter could not upgrade opset {opset} -> {cfg.target_opset}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", subject=name) from None
            changed = interface_changes(model, converted)
            if changed:
                raise OpsetError(f"onnx.version_converter changed the model's interface upgrading opset {opset} -> "
                                 f"{cfg.target_opset}: {'; '.join(changed[:3])}", subject=name,
                                 hint="the upgraded model would not take the same inputs or give the same outputs; "
                                      "upgrade and check it yourself, or use --per-tensor (opset >= 10)")
            info["output"] = cfg.target_opset
            return converted, info, [f"opset upgraded {opset} -> {cfg.target_opset} as asked (--target-opset)"]
        return model, info, []
    if opset < QDQ_MIN_OPSET:
        raise OpsetError(f"opset {opset} has no QuantizeLinear/DequantizeLinear (needs >= {QDQ_MIN_OPSET})",
                         subject=name, hint=hint_up)
    if cfg.per_channel and opset < PER_CHANNEL_MIN_OPSET:
        raise OpsetError(f"opset {opset} is below {PER_CHANNEL_MIN_OPSET}, which per-channel DequantizeLinear needs; "
                         "qpass never changes the opset silently", subject=name,
                         hint=f"{hint_up}, or use --per-tensor")
    return model, info, []
