"""fuse-rms-norm: an RMSNorm, written out op by op or ATen's, as the native ``qc.rms_norm``.

    mul(γ, mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim=True), ε))))  ->  qc.rms_norm(x, γ, ε)
    mul(mul(x, rsqrt(...)), γ)                                           ->  the same
    aten.rms_norm(x, [d], γ, ε)                                          ->  the same

y = γ · x / √(mean(x²) + ε) over the last dimension (of size d), as transformers' Llama, Qwen2,
Mistral and T5 norms compute it (``nn.RMSNorm`` exports as ATen's op). Six ATen calls, each a
pass over x and an allocation, become one native pass (``qcompile/csrc/rms_norm.cpp``). ATen's
own ``rms_norm`` is no better on CPU: a composite of the same six ops, about 60 µs for a row of
896 on a Zen 1 against about 2 µs native, and a decode step of a 24-layer decoder makes 49 of
them. It matches when γ is a float32 constant of shape [d] (or absent, for ATen's) and x is
float32 (so the ``to(float32)`` these norms begin with is gone after canonicalize); the
written-out pattern's inner values have no other readers. The kernel sums x² in its own order,
so the result is the written-out one's to fp32 rounding (its kernel contract) and the pass does
not claim bit-for-bit semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile import native  # noqa: F401  (loads the extension, which defines the op)
from qcompile.ir.graph import constant_value, insert_call, is_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.kernel_check import register_kernel
from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import Match, Rule, RuleSet, apply_rule_set, register_rule_set

aten = torch.ops.aten
rms_norm = torch.ops.qc.rms_norm.default


@torch.library.register_fake("qc::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The written-out RMSNorm it replaces."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else weight * y


register_kernel(rms_norm, reference_rms_norm)


def _normalized(x: Any) -> Any:
    return aten.mul.Tensor(x, aten.rsqrt.default(aten.add.Tensor(
        aten.mean.dim(aten.pow.Tensor_Scalar(x, 2), [-1], True), 1e-6)))


class RmsNorm(Rule):
    """The written-out RMSNorm (module doc), γ on the left or on the right of the last multiply."""

    def __init__(self, weight_first: bool):
        self.name = "rms-norm" if weight_first else "rms-norm-weight-last"
        if weight_first:
            self.pattern = lambda x, weight: aten.mul.Tensor(weight, _normalized(x))
        else:
            self.pattern = lambda x, weight: aten.mul.Tensor(_normalized(x), weight)

    def check(self, match: Match) -> str | None:
        # literals match anything (ε is checked below), so a multiply by a number matches the anchor alone
        if len(match.nodes) != 6 or not all(isinstance(match.bindings.get(n), fx.Node) for n in ("x", "weight")):
            return "not a written-out RMSNorm"
        x = match["x"].meta.get("val")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() == 0:
            return "x is not a float32 tensor"
        weight = constant_value(match.graph_module, match["weight"])
        if weight is None or tuple(weight.shape) != (x.shape[-1],) or weight.dtype != torch.float32:
            return f"the scale is not a float32 constant of shape [{x.shape[-1]}]"
        if op_arguments(match.op(aten.pow.Tensor_Scalar))["exponent"] != 2:
            return "the power is not a square"
        mean = op_arguments(match.op(aten.mean.dim))
        if list(mean["dim"]) not in ([-1], [x.dim() - 1]) or mean["keepdim"] is not True:
            return "the mean is not over the last dimension, kept"
        add = op_arguments(match.op(aten.add.Tensor))
        if not isinstance(add["other"], (int, float)) or add["alpha"] != 1:
            return "ε is not a number"
        return None

    def rewrite(self, match: Match) -> None:
        x = match["x"]
        eps = float(op_arguments(match.op(aten.add.Tensor))["other"])
        provenance = Provenance(match.pass_name, self.name, tuple(n.name for n in match.nodes))
        fused = insert_call(match.graph_module, rms_norm, (x, match["weight"], eps), before=match.anchor,
                            provenance=provenance, meta_from=match.anchor)
        match.anchor.replace_all_uses_with(fused)
        dead = [n for n in match.nodes if not n.users]
        while dead:  # the anchor, then what only it read
            for node in dead:
                match.graph.erase_node(node)
            dead = [n for n in match.nodes if not n._erased and not n.users]


RMS_NORM_RULES = register_rule_set(RuleSet("fuse-rms-norm", [RmsNorm(weight_first=True), RmsNorm(weight_first=False)]))


def _native_form(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """``(x, γ, ε)`` of an ATen ``rms_norm`` the native kernel runs: float32 x normalized over its
    last dimension, γ a float32 constant of that size or absent."""
    norm = op_arguments(node)
    x = norm["input"].meta.get("val") if isinstance(norm["input"], fx.Node) else None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() == 0:
        return None
    if len(norm["normalized_shape"]) != 1 or norm["normalized_shape"][0] != x.shape[-1]:
        return None
    weight = norm["weight"]
    if weight is not None:
        value = constant_value(gm, weight)
        if value is None or tuple(value.shape) != (x.shape[-1],) or value.dtype != torch.float32:
            return None
    eps = norm["eps"]
    return norm["input"], weight, float(torch.finfo(torch.float32).eps if eps is None else eps)


@dataclass(frozen=True)
class FuseRmsNorm(Pass):
    name: ClassVar[str] = "fuse-rms-norm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts = dict(apply_rule_set(gm, RMS_NORM_RULES, self.name))
        for node in [n for n in gm.graph.nodes if is_call(n, aten.rms_norm.default)]:
            form = _native_form(gm, node)
            if form is None:
                continue
            provenance = Provenance(self.name, "aten-rms-norm", (node.name,))
            native_norm = insert_call(gm, rms_norm, form, before=node, provenance=provenance, meta_from=node)
            node.replace_all_uses_with(native_norm)
            gm.graph.erase_node(node)
            counts["aten-rms-norm"] = counts.get("aten-rms-norm", 0) + 1
        return PassResult(gm, bool(counts), counts)
