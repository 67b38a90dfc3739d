"""Typed access to node metadata.

Node metadata is the contract between passes. torch.export fills ``val`` (a fake tensor),
``nn_module_stack`` and ``stack_trace``; qcompile adds its own keys under the ``qc.`` prefix.
Passes read and write qcompile's keys only through these accessors so that a key's type is
defined in one place and the canonical printer can show them in a stable order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.spec import QuantSpec

QSPEC_KEY = "qc.qspec"
PROVENANCE_KEY = "qc.provenance"
FUSION_KEY = "qc.fusion"
QC_PREFIX = "qc."


@dataclass(frozen=True)
class Provenance:
    """Which pass (and which of its rules) created a node, and from which nodes.

    Frozen so that the shallow meta copy the pass manager makes per pass can share it.
    """

    pass_name: str
    rule: str | None = None
    sources: tuple[str, ...] = ()

    def __str__(self) -> str:
        rule = f"/{self.rule}" if self.rule else ""
        sources = f" from {', '.join(self.sources)}" if self.sources else ""
        return f"{self.pass_name}{rule}{sources}"


@dataclass(frozen=True)
class EdgeQuant:
    """How one input edge of an op is quantized.

    ``role`` is ``activation`` (observed at run time), ``weight`` (a constant, quantized once)
    or ``bias`` (int32 with the derived scale S_input · S_weight, zero point 0, as ONNX's
    QLinearConv and PT2E use). ``observe_at`` names the node whose output is observed for an
    activation: the edge's producer, or further up through ops that share their input's qparams
    (view, permute, max-pool...), so one observer and one Q/DQ pair serve the whole chain.
    """

    role: str
    spec: QuantSpec
    observe_at: str | None = None

    def __str__(self) -> str:
        where = f"@{self.observe_at}" if self.observe_at else ""
        return f"{self.role}:{self.spec}{where}"


@dataclass(frozen=True)
class QuantAnnotation:
    """The plan for one node: its quantized input edges (by argument index), or why it stays float.

    ``rule`` names the QConfig rule that decided; ``shares_qparams_of`` marks a shape op whose
    output keeps its input's qparams; ``smooth`` is False when the config opted the node out of
    outlier smoothing (a replayed plan must opt it out again). ``output`` quantizes the node's
    own output for readers that would read it float, where the target's kernel must end in a
    quantize (ONNX Runtime fuses DequantizeLinear → Conv → QuantizeLinear, never an
    unquantized Conv).
    """

    inputs: tuple[tuple[int, EdgeQuant], ...] = ()
    rule: str = ""
    float_reason: str | None = None
    shares_qparams_of: str | None = None
    smooth: bool = True
    output: EdgeQuant | None = None

    @property
    def quantized(self) -> bool:
        return bool(self.inputs)

    def activation_specs_from(self, node: fx.Node, source: fx.Node) -> list[QuantSpec]:
        """The specs this plan (of ``node``) quantizes ``source`` with, where ``node`` reads it as an activation."""
        return [edge.spec for index, edge in self.inputs
                if edge.role == "activation" and index < len(node.args) and node.args[index] is source]

    def edge(self, index: int) -> EdgeQuant | None:
        return dict(self.inputs).get(index)

    def __str__(self) -> str:
        if self.shares_qparams_of:
            return f"shares({self.shares_qparams_of})"
        if self.float_reason:
            return f"float({self.float_reason})"
        edges = [f"{i}={edge}" for i, edge in self.inputs] + ([f"out={self.output}"] if self.output else [])
        return "[" + ", ".join(edges) + "]"


@dataclass(frozen=True)
class Fusion:
    """A group that lowers to one kernel: anchor (linear/conv) [-> binary add] [-> unary], or
    anchor -> unary. Node names, so the record survives graph copies."""

    unary: str | None = None
    unary_node: str | None = None
    add_node: str | None = None
    add_other: int | None = None  # argument index of the add's other operand
    last: str = ""

    def __str__(self) -> str:
        parts = [p for p in ("add" if self.add_node else None, self.unary) if p]
        return "fuse(" + "+".join(parts or ["alone"]) + f"->{self.last})"


def get_qspec(node: fx.Node) -> QuantAnnotation | None:
    return node.meta.get(QSPEC_KEY)


def set_qspec(node: fx.Node, annotation: QuantAnnotation) -> None:
    node.meta[QSPEC_KEY] = annotation


def get_fusion(node: fx.Node) -> Fusion | None:
    return node.meta.get(FUSION_KEY)


def set_fusion(node: fx.Node, fusion: Fusion) -> None:
    node.meta[FUSION_KEY] = fusion


def get_provenance(node: fx.Node) -> Provenance | None:
    return node.meta.get(PROVENANCE_KEY)


def set_provenance(node: fx.Node, provenance: Provenance) -> None:
    node.meta[PROVENANCE_KEY] = provenance


# A provenance rule: the node computes the value of the one node its provenance names, under a
# new name (a piece cut from a merged op). The report follows it to keep per-node figures.
STANDS_FOR = "stands-for"


def stand_ins(graph: fx.Graph) -> dict[str, fx.Node]:
    """Earlier nodes' names mapped to the nodes that now compute their values."""
    found = {}
    for node in graph.nodes:
        provenance = get_provenance(node)
        if provenance is not None and provenance.rule == STANDS_FOR and len(provenance.sources) == 1:
            found[provenance.sources[0]] = node
    return found


def qc_meta(node: fx.Node) -> dict[str, Any]:
    """qcompile's own keys of a node, sorted by key for stable printing."""
    return {k: node.meta[k] for k in sorted(node.meta) if k.startswith(QC_PREFIX)}


def fake_value(node: fx.Node) -> Any:
    """The fake value export recorded for a node (a FakeTensor, SymInt, tuple, or None)."""
    return node.meta.get("val")


def tensor_value(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def source_module(node: fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the innermost user module a node came from."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, type_name = list(stack.values())[-1]
    if not isinstance(type_name, str):
        type_name = getattr(type_name, "__qualname__", str(type_name))
    return path, type_name.rsplit(".", 1)[-1]


def source_line(node: fx.Node) -> str | None:
    """The last ``File ..., line N`` of the node's stack trace, i.e. where user code made it."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    file_lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return file_lines[-1] if file_lines else None
