"""The resolved plan as data: per node, what was quantized, how, by which rule, and with which
calibrated scale and zero point; or why the node stayed float.

``annotate`` decides the plan on the float graph and calibration fixes the activation
qparams, so the plan is read off both: the annotated graph for the specs and reasons, the Q/DQ
graph for the numbers. It is plain JSON-ready data, so a plan can be diffed between two
compiles, reviewed, or checked by a script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import fx

from qcompile.errors import QCompileError
from qcompile.ir.meta import EdgeQuant, get_qspec, source_module
from qcompile.qconfig import OpQuantConfig, QConfig, op_kind
from qcompile.qdq import is_dequantize, is_quantize, qparams_of
from qcompile.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


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


def _described(edge: EdgeQuant) -> dict[str, Any]:
    """An edge's spec as the plan JSON writes it."""
    spec = edge.spec
    described: dict[str, Any] = {"role": edge.role, "dtype": spec.dtype, "symmetric": spec.symmetric,
                                 "granularity": str(spec.granularity), "observer": spec.observer}
    if spec.observer == "percentile":
        described["percentile"] = spec.percentile
    if spec.margin:
        described["margin"] = spec.margin
    if spec.rounding != "nearest":
        described["rounding"] = spec.rounding
    if spec.bias_correction:
        described["bias_correction"] = True
    if edge.observe_at:
        described["observe_at"] = edge.observe_at
    return described


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
        inputs = [{"index": index, **_described(edge), **_calibrated(qdq, edge, node.name, index)}
                  for index, edge in plan.inputs]
        if plan.output is not None:  # derived from the target's rules on replay; written for the reader
            entry["output"] = _described(plan.output)
        if inputs:
            entry["inputs"] = inputs
            if not plan.smooth:
                entry["smooth"] = False
        entries.append(entry)
    return entries


_GRANULARITY = re.compile(r"per-tensor|per-token|per-channel\((-?\d+)\)|per-group\((-?\d+),(\d+)\)")


def _spec(described: dict[str, Any]) -> QuantSpec:
    match = _GRANULARITY.fullmatch(described["granularity"])
    if match is None:
        raise QCompileError(f"plan: granularity '{described['granularity']}' is not per-tensor, per-token, "
                            "per-channel(axis) or per-group(axis,size)")
    channel, group_axis, group_size = match.groups()
    granularity = (PerChannel(int(channel)) if channel is not None else
                   PerGroup(int(group_axis), int(group_size)) if group_axis is not None else
                   PerToken() if described["granularity"] == "per-token" else PerTensor())
    extra = {key: described[key] for key in ("percentile", "margin", "rounding", "bias_correction") if key in described}
    return QuantSpec(described["dtype"], described["symmetric"], granularity, described["observer"], **extra)


def plan_qconfig(plan: str | Path | dict[str, Any]) -> QConfig:
    """The QConfig that replays a plan written by ``report.write_plan``: each node it lists gets
    the specs it lists (or stays float, with an edited plan too), every other node stays float.
    The same model and calibration data then give the same Q/DQ graph."""
    data = json.loads(Path(plan).read_text()) if isinstance(plan, (str, Path)) else plan
    try:
        entries = data["nodes"]
        config = QConfig()
        for entry in entries:
            if "shares_qparams_of" in entry:
                continue
            specs = {e["role"]: _spec(e) for e in entry.get("inputs", ()) if e["role"] in ("activation", "weight")}
            chosen = OpQuantConfig(specs.get("activation"), specs.get("weight"),
                                   smooth=entry.get("smooth", True)) if specs else None
            config = config.set_node(entry["node"], chosen)
    except (KeyError, TypeError, ValueError) as exc:
        raise QCompileError(f"plan {plan if not isinstance(plan, dict) else ''}: not a qcompile plan "
                            f"({type(exc).__name__}: {exc})") from exc
    return config
