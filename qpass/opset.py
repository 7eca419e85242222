"""The opset policy: never changed silently. A model below the opset the run needs (13 for per-channel weights, 10 for
QuantizeLinear, 21 for 16-bit activations and block-wise weight-only, 25 for ternary) is upgraded to it with
onnx.version_converter, with a warning (``opset_upgrade``; the run validates the result against the original);
``target_opset`` upgrades further when asked. Either only when the model's interface survives the upgrade (a dim the
converter only made known is put back as declared)."""
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


def keep_declared_dims(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    """Give ``after``'s graph inputs and outputs the dims ``before`` declared where the converter only made an unknown
    dim known (``[?, ?]`` -> ``[?, 384]``), so the interface stays as given; the number of dims put back. A dim that
    changed value, a rank or a type that changed, is left for :func:`interface_changes` to report."""
    put_back = 0
    for old_list, new_list in ((before.graph.input, after.graph.input), (before.graph.output, after.graph.output)):
        old = {vi.name: vi for vi in old_list}
        for vi in new_list:
            o = old.get(vi.name)
            if o is None or not (o.type.HasField("tensor_type") and vi.type.HasField("tensor_type")):
                continue
            ot, nt = o.type.tensor_type, vi.type.tensor_type
            if ot.elem_type != nt.elem_type or not (ot.HasField("shape") and nt.HasField("shape")):
                continue
            if len(ot.shape.dim) != len(nt.shape.dim):
                continue
            for od, nd in zip(ot.shape.dim, nt.shape.dim):
                if not od.HasField("dim_value") and nd.HasField("dim_value"):
                    nd.CopyFrom(od)
                    put_back += 1
    return put_back


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
    """The model at the opset the run needs, the opsets in and out (``upgraded``: why, when qpass chose to), and
    warnings; an opset too low for what the configuration asks, and not upgraded, raises :class:`OpsetError` naming the
    fix."""
    opset = default_opset(model)
    info = {"input": opset, "output": opset}
    final = cfg.target_opset or opset
    if cfg.weight_only:
        needed_wo, writes = ((INT2_MIN_OPSET, "int2 DequantizeLinear") if cfg.weight_only == "ternary"
                             else (BLOCKED_MIN_OPSET, "block-wise DequantizeLinear"))
        if final < needed_wo and (cfg.target_opset is not None or not cfg.opset_upgrade):
            raise OpsetError(f"weight-only {cfg.weight_only} writes {writes}, which needs opset {needed_wo}; the model "
                             f"would have {final}" + ("" if cfg.opset_upgrade else " (--keep-opset)"), subject=name,
                             hint=f"use --target-opset {needed_wo} (onnx.version_converter)")
    sixteen = cfg.activation_type in SIXTEEN_BIT_TYPES
    if sixteen and final < INT16_MIN_OPSET and (cfg.target_opset is not None or not cfg.opset_upgrade):
        raise OpsetError(f"{cfg.activation_type} activations need QuantizeLinear from opset {INT16_MIN_OPSET}; "
                         f"the model would have {final}", subject=name,
                         hint=f"use --target-opset {INT16_MIN_OPSET} or an 8-bit --activation-type")
    if cfg.target_opset is not None:
        if cfg.target_opset < opset:
            raise OpsetError(f"model has opset {opset}; downgrading to {cfg.target_opset} is not supported",
                             subject=name, hint=f"use --target-opset {opset} or higher, or leave it out")
        if cfg.target_opset > opset:
            converted = upgrade(model, opset, cfg.target_opset, name, f"upgrading opset {opset} -> {cfg.target_opset}",
                                 "upgrade and check it yourself, or use --per-tensor (opset >= 10)")
            info["output"] = cfg.target_opset
            return converted, info, [f"opset upgraded {opset} -> {cfg.target_opset} as asked (--target-opset)"]
        return model, info, []
    needed = PER_CHANNEL_MIN_OPSET if cfg.per_channel else QDQ_MIN_OPSET
    why = ("per-channel DequantizeLinear" if cfg.per_channel else "QuantizeLinear/DequantizeLinear")
    if sixteen:
        needed, why = INT16_MIN_OPSET, f"{cfg.activation_type} QuantizeLinear"
    if cfg.weight_only:
        needed, why = needed_wo, f"weight-only {cfg.weight_only}'s {writes}"
    if opset >= needed:
        return model, info, []
    per_tensor_helps = cfg.per_channel and not sixteen and not cfg.weight_only and opset >= QDQ_MIN_OPSET
    if not cfg.opset_upgrade:
        raise OpsetError(f"opset {opset} is below {needed}, which {why} needs; --keep-opset asks not to upgrade it",
                         subject=name, hint=f"rerun with --target-opset {needed} to upgrade it with onnx.version_converter"
                         + (", or use --per-tensor" if per_tensor_helps else ""))
    fallback = "use --per-tensor, which needs only opset 10" if per_tensor_helps else "upgrade the model yourself"
    converted = upgrade(model, opset, needed, name, f"upgrading opset {opset} -> {needed}, which {why} needs", fallback)
    info["output"] = needed
    info["upgraded"] = f"{why} needs opset {needed}"
    checked = "; the result is validated against the model as given" if cfg.validate else ""
    return converted, info, [f"opset upgraded {opset} -> {needed}: {why} needs it (onnx.version_converter; inputs and "
                             f"outputs unchanged{checked}). --keep-opset refuses instead"
                             + (f", --per-tensor keeps opset {opset}" if per_tensor_helps else "")]


def upgrade(model: onnx.ModelProto, opset: int, target: int, name: str, what: str, hint: str) -> onnx.ModelProto:
    """``model`` converted to ``target`` by onnx.version_converter, full-checked, with its interface unchanged; an
    :class:`OpsetError` saying ``what`` failed otherwise."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        keep_declared_dims(model, converted)
        converted.ir_version = max(converted.ir_version, min_ir_version(converted))
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
        raise OpsetError(f"onnx.version_converter failed {what}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", subject=name,
                         hint=hint) from None
    changed = interface_changes(model, converted)
    if changed:
        raise OpsetError(f"onnx.version_converter changed the model's interface {what}: {'; '.join(changed[:3])}",
                         subject=name, hint="the upgraded model would not take the same inputs or give the same "
                                            f"outputs; {hint}")
    return converted
