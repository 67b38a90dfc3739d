"""QConfig: which quantization applies to which node.

Rules match a node by the user module it came from (``nn_module_stack``) or by its op:

    module name (exact)  >  module name regex  >  module type  >  op kind  >  default

The most specific category wins; within the module categories the innermost module wins, so a
rule for ``encoder.layer.0`` covers that layer's linears unless a rule names the linear itself.
A rule whose value is ``None`` keeps the node in float. ``resolve`` returns the chosen config
and the rule that chose it, which is what the per-node report prints.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qcompile.spec import PerChannel, PerTensor, PerToken, QuantSpec


@dataclass(frozen=True)
class OpQuantConfig:
    """Specs for an op's activation inputs and its weight; ``None`` leaves that edge float.

    ``smooth``: a linear whose activations are quantized has its input's outlier channels
    smoothed (``smooth-outliers``) when the compile smooths; False opts this linear out. A
    value several linears read is smoothed when any of them asks (the rewrite is exact in
    float, so the others read the same function).
    """

    activation: QuantSpec | None = None
    weight: QuantSpec | None = None
    smooth: bool = True


Choice = OpQuantConfig | None  # None keeps the node float


@dataclass(frozen=True)
class Candidate:
    """One format a precision search (``qcompile.sensitivity``, ``compile(accuracy_budget=...)``)
    may give a node: a short name for tables and plans, and its config (None: float, which the
    target runs in its float kernels)."""

    name: str
    config: Choice


def op_kind(node: fx.Node) -> str:
    """``aten.linear.default`` -> ``linear``: the name op-kind rules use."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _module_chain(node: fx.Node) -> list[tuple[str, str]]:
    """(qualified name, type's qualified name) from innermost to outermost user module."""
    stack = node.meta.get("nn_module_stack") or {}
    chain = []
    for path, type_name in reversed(list(stack.values())):
        if not isinstance(type_name, str):
            type_name = f"{type_name.__module__}.{type_name.__qualname__}"
        chain.append((path, type_name))
    return chain


@dataclass(frozen=True)
class QConfig:
    default: Choice = None
    by_op: dict[str, Choice] = field(default_factory=dict)
    by_module_type: dict[str, Choice] = field(default_factory=dict)
    by_module_regex: tuple[tuple[str, Choice], ...] = ()
    by_module_name: dict[str, Choice] = field(default_factory=dict)
    # Per graph node, the most specific of all: what a replayed plan (qcompile.plan) and the
    # accuracy-budget search (qcompile.mixed_precision) set, with why in ``node_reasons``.
    by_node: dict[str, Choice] = field(default_factory=dict)
    node_reasons: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rules = (len(self.by_op) + len(self.by_module_type) + len(self.by_module_regex) + len(self.by_module_name)
                 + len(self.by_node))
        return f"<QConfig with {rules} rules>"

    def set_default(self, config: Choice) -> QConfig:
        return dataclasses.replace(self, default=config)

    def set_op(self, kind: str, config: Choice) -> QConfig:
        return dataclasses.replace(self, by_op={**self.by_op, kind: config})

    def set_module_type(self, module_type: type[nn.Module] | str, config: Choice) -> QConfig:
        key = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"
        return dataclasses.replace(self, by_module_type={**self.by_module_type, key: config})

    def set_module_regex(self, pattern: str, config: Choice) -> QConfig:
        re.compile(pattern)  # fail here, naming the pattern, rather than at resolve time
        return dataclasses.replace(self, by_module_regex=(*self.by_module_regex, (pattern, config)))

    def set_module_name(self, name: str, config: Choice) -> QConfig:
        return dataclasses.replace(self, by_module_name={**self.by_module_name, name: config})

    def set_node(self, name: str, config: Choice, reason: str | None = None) -> QConfig:
        """``config`` for the graph node ``name``; ``reason`` is what the plan says chose it."""
        reasons = {**self.node_reasons, name: reason} if reason else self.node_reasons
        return dataclasses.replace(self, by_node={**self.by_node, name: config}, node_reasons=reasons)

    def resolve(self, node: fx.Node) -> tuple[Choice, str]:
        """The config for ``node`` and a description of the rule that chose it."""
        if node.name in self.by_node:
            return self.by_node[node.name], self.node_reasons.get(node.name, f"node '{node.name}' of a replayed plan")
        chain = _module_chain(node)
        for path, _ in chain:
            if path in self.by_module_name:
                return self.by_module_name[path], f"module name '{path}'"
        for path, _ in chain:
            for pattern, config in self.by_module_regex:
                if re.fullmatch(pattern, path):
                    return config, f"module regex '{pattern}' on '{path}'"
        for path, type_name in chain:
            for key in (type_name, type_name.rsplit(".", 1)[-1]):
                if key in self.by_module_type:
                    return self.by_module_type[key], f"module type {key} of '{path}'"
        kind = op_kind(node)
        if kind in self.by_op:
            return self.by_op[kind], f"op kind '{kind}'"
        return self.default, "default"


INT8_ACTIVATION = QuantSpec("uint8", symmetric=False)
# Each row (token) quantized with its own range at run time: dynamic int8 for activations whose
# range varies by row (cpu-int8's int8 linear applies each row's scale in its epilogue; its W4A8
# groups read them too).
TOKEN_ACTIVATION = QuantSpec("uint8", symmetric=False, granularity=PerToken())
INT8_WEIGHT = QuantSpec("int8", symmetric=True, granularity=PerChannel(0))


def int8_preset() -> QConfig:
    """int8 on x86 (cpu-int8, onnx-qdq): uint8 affine activations per tensor, int8 symmetric
    weights per output channel (the layout oneDNN's qlinear/qconv and ONNX Runtime's QDQ fusions
    take) for linear and conv2d, int8 rows for embedding tables (weight-only: a lookup's indices
    are integers already; a transformer's vocabulary table is most of its bytes), and uint8
    inputs for adds, which each target's rule limits to adds that join convolutions. Everything
    else is float, which is what keeps transformer accuracy: LayerNorm, residual adds on the
    float stream and attention stay in float."""
    config = OpQuantConfig(INT8_ACTIVATION, INT8_WEIGHT)
    return QConfig(by_op={"linear": config, "conv2d": config, "embedding": OpQuantConfig(None, INT8_WEIGHT),
                          "add": OpQuantConfig(INT8_ACTIVATION, None)})


FP8_ACTIVATIONS = {"per-tensor": PerTensor(), "per-token": PerToken()}


def fp8_qconfig(dtype: str = "float8_e4m3fn", activations: str | None = "per-tensor", margin: int = 0) -> QConfig:
    """FP8 for linears and embedding tables: ``dtype`` (E4M3, or E5M2) weights per output
    channel (rows for tables) and, unless ``activations`` is None (weight-only), activations per
    tensor (calibrated amax) or per token (each row's amax at run time), all scaled with
    ``margin`` (:class:`QuantSpec`). Everything else stays float, as in :func:`int8_preset`."""
    if activations is not None and activations not in FP8_ACTIVATIONS:
        raise ValueError(f"fp8_qconfig activations must be one of {', '.join(FP8_ACTIVATIONS)} or None, "
                         f"got {activations!r}")
    weight = QuantSpec(dtype, granularity=PerChannel(0), margin=margin)
    activation = (None if activations is None
                  else QuantSpec(dtype, granularity=FP8_ACTIVATIONS[activations], margin=margin))
    return QConfig(by_op={"linear": OpQuantConfig(activation, weight), "embedding": OpQuantConfig(None, weight)})
