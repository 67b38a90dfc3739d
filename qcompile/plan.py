"""The resolved plan as data: per node, what was quantized, how, by which rule, and with which
calibrated scale and zero point; or why the node stayed float.

``annotate`` decides the plan on the float graph and calibration fixes the activation
qparams, so the plan is read off both: the annotated graph for the specs and reasons, the Q/DQ
graph for the numbers. It is plain JSON-ready data, so a plan can be diffed between two
compiles, reviewed, or checked by a script.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from qcompile.ir.meta import EdgeQuant, get_qspec, source_module
from qcompile.qconfig import op_kind
from qcompile.qdq import is_dequantize, is_quantize, qparams_of


def _scalar_qparams(gm: fx.GraphModule, node: fx.Node) -> dict[str, float | int]:
    params = qparams_of(gm, node)
    if not params.static or params.axis is not None:
        return {}
    return {"scale": float(params.scale.reshape(())), "zero_point": int(params.zero_point.reshape(()))}


def _calibrated(qdq: fx.GraphModule | None, edge: EdgeQuant, consumer: str, index: int) -> dict[str, Any]:
    """The qparams the Q/DQ graph gives an activation edge (per-tensor, static), if any."""
    if qdq is None or edge.role != "activation":
        return {}
    nodes = {n.name: n for n in qdq.graph.nodes}
    observed = nodes.get(edge.observe_at or "")
    quantize = next((u for u in observed.users if is_quantize(u)), None) if observed is not None else None
    if quantize is not None:
        return _scalar_qparams(qdq, quantize)
    node = nodes.get(consumer)  # the observed value may have been folded away: read the input's DQ
    source = node.args[index] if node is not None and index < len(node.args) else None
    return _scalar_qparams(qdq, source) if is_dequantize(source) else {}


def resolved_plan(planned: fx.GraphModule, qdq: fx.GraphModule | None = None) -> list[dict[str, Any]]:
    """One entry per node the plan decided on, in graph order."""
    entries = []
    for node in planned.graph.nodes:
        plan = get_qspec(node)
        if plan is None:
            continue
        module = source_module(node)
        entry: dict[str, Any] = {"node": node.name, "op": op_kind(node), "module": module[0] if module else "",
                                 "rule": plan.rule}
        if plan.shares_qparams_of:
            entry["shares_qparams_of"] = plan.shares_qparams_of
        elif plan.float_reason:
            entry["float_reason"] = plan.float_reason
        inputs = []
        for index, edge in plan.inputs:
            spec = edge.spec
            described: dict[str, Any] = {
                "index": index, "role": edge.role, "dtype": spec.dtype, "symmetric": spec.symmetric,
                "granularity": str(spec.granularity), "observer": spec.observer,
            }
            if edge.observe_at:
                described["observe_at"] = edge.observe_at
            described.update(_calibrated(qdq, edge, node.name, index))
            inputs.append(described)
        if inputs:
            entry["inputs"] = inputs
        entries.append(entry)
    return entries
