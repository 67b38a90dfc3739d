"""canonicalize: drop what inference does not need.

    dropout(x, p, train=False)            -> x        (and feature/alpha dropout)
    to(x, dtype) with x already that dtype -> x        (to.dtype, to.device, _to_copy, type_as)
    clone(x) / detach(x) / alias(x)       -> x        (unless x or the result is written in place)
    pad(x, [0, 0, ...]) / constant_pad_nd -> x        a pad of nothing (TF-style "same" padding
                                                     computes one per layer, mostly zeros), same
                                                     condition; kept, it is a copy and a float
                                                     op between two int8 convolutions
    relu_(x), add_(x, y), ... in place    -> relu(x), add(x, y), ...   when x is a fresh value
                                                     (not an input, weight or view) that nothing
                                                     views: later reads of x read the result
    _assert_*(...), sym_constrain_range*  -> (gone)   export's runtime checks
    call_module _guards_fn(...)           -> (gone)   export's input-shape guard
    conv2d(pad(x, [l, l, t, t]), W, b, s, p, d, g) -> conv2d(x, W, b, s, p + (t, l), d, g)
                                                     a symmetric zero pad before a convolution is its
                                                     padding (the kernels pad without a copy)
    conv2d(x, W, b, s, "valid" | "same", d, g) -> conv2d(x, W, b, s, p, d, g)
                                                     the padding as numbers (conv1d/2d/3d): "valid"
                                                     is 0; "same" (stride 1) is d·(k−1)/2 per side
    cat([e, x, ...], d) with e a constant 1-D empty tensor
                                          -> cat([x, ...], d), or x alone when it is the only
                                                     operand left and has the result's dtype:
                                                     ATen's cat skips 1-D empties (a KV cache
                                                     made empty and then extended captures as
                                                     cat(tensor([]), past), a copy of the whole
                                                     cache per layer and step)
    values nothing uses                   -> (gone)   e.g. sym_size feeding a removed assert

Out-of-place forms are what every later pass matches (``nn.ReLU(inplace=True)`` exports as
``relu_``, ``out += identity`` as ``add_``), and a value written in place cannot be fused or
quantized on its own. Every rewrite keeps the value bit for bit (folding a pad into a
convolution adds the same zeros, with the convolution's own summation order), so the pass
claims to preserve semantics and the NumericCheck instrument holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.ir.graph import aliases, constant_value, is_call, is_mutating, op_arguments, remove_dead_nodes, returns_alias
from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import Match, Rule, RuleSet, apply_rule_set, register_rule_set

aten = torch.ops.aten


def _op_name(op: Any) -> str:
    return str(op).removeprefix("aten.").removesuffix(".default")


class SingleOpRule(Rule):
    """A rule whose pattern is one op on a tensor ``x``; the matcher fills and ignores literals."""

    def __init__(self, op: Any):
        self.op = op
        self.name = f"drop-{_op_name(op)}"
        self.pattern = lambda x: op(x)


def _forward_input(match: Match) -> None:
    """op(x) -> x: every use of the op's result now reads its input."""
    match.anchor.replace_all_uses_with(match["x"])
    match.graph.erase_node(match.anchor)


class DropoutInEval(SingleOpRule):
    """dropout(x, p, train=False) -> x"""

    def check(self, match: Match) -> str | None:
        if op_arguments(match.anchor)["train"] is not False:
            return "dropout runs in training mode (call model.eval() before capture)"
        return None

    rewrite = staticmethod(_forward_input)


class NoOpConversion(SingleOpRule):
    """to(x, ...) -> x when dtype, device, layout and memory format stay the same"""

    def check(self, match: Match) -> str | None:
        source, result = match["x"], match.anchor
        before, after = source.meta.get("val"), result.meta.get("val")
        if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
            return "input or output has no tensor metadata"
        for attribute in ("dtype", "device", "layout"):
            if getattr(before, attribute) != getattr(after, attribute):
                return f"changes {attribute} from {getattr(before, attribute)} to {getattr(after, attribute)}"
        return _changes_memory_format(result) or _written_in_place(source, result)

    rewrite = staticmethod(_forward_input)


class IdentityCopy(SingleOpRule):
    """clone(x) -> x, detach(x) -> x, alias(x) -> x"""

    def check(self, match: Match) -> str | None:
        return _changes_memory_format(match.anchor) or _written_in_place(match["x"], match.anchor)

    rewrite = staticmethod(_forward_input)


class NothingPadded(SingleOpRule):
    """pad(x, [0, ...]) -> x, constant_pad_nd(x, [0, ...]) -> x: the same values, any mode"""

    def check(self, match: Match) -> str | None:
        amounts = op_arguments(match.anchor)["pad"]
        if not all(isinstance(a, int) and a == 0 for a in amounts):
            return f"pads {list(amounts)}"
        return _written_in_place(match["x"], match.anchor)

    rewrite = staticmethod(_forward_input)


class ExplicitConvPadding(SingleOpRule):
    """conv(x, W, b, stride, "valid" | "same", dilation, groups) -> conv.default(..., padding as numbers):
    the overload every rule, kernel and exporter knows (EfficientNet's convolutions use "valid")."""

    def __init__(self, op: Any, default: Any):
        super().__init__(op)
        self.name, self.default = f"explicit-{_op_name(op).split('.')[0]}-padding", default

    def padding(self, match: Match) -> list[int] | str:
        conv = op_arguments(match.anchor)
        weight = conv["weight"].meta.get("val")
        if not isinstance(weight, torch.Tensor):
            return "the weight has no tensor metadata"
        spatial = weight.dim() - 2
        if conv["padding"] == "valid":
            return [0] * spatial
        dilation = list(conv["dilation"]) * (spatial if len(conv["dilation"]) == 1 else 1)
        if any(s != 1 for s in conv["stride"]):
            return "'same' padding with a stride other than 1"
        total = [d * (int(k) - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total):
            return "'same' padding that is not symmetric (an even kernel extent)"
        return [t // 2 for t in total]

    def check(self, match: Match) -> str | None:
        padding = self.padding(match)
        return padding if isinstance(padding, str) else None

    def rewrite(self, match: Match) -> None:
        conv = op_arguments(match.anchor)
        args = (conv["input"], conv["weight"], conv["bias"], list(conv["stride"]), self.padding(match),
                list(conv["dilation"]), conv["groups"])
        with match.graph.inserting_before(match.anchor):
            explicit = match.graph.call_function(self.default, args)
        explicit.meta = dict(match.anchor.meta)
        match.anchor.replace_all_uses_with(explicit)
        match.graph.erase_node(match.anchor)


class PadIntoConv(SingleOpRule):
    """conv2d(pad(x, [l, l, t, t], 0), ..., padding p) -> conv2d(x, ..., padding p + (t, l)): both
    add the same zeros around x. The pad stays for its other users, if any."""

    def __init__(self) -> None:
        super().__init__(aten.conv2d.default)
        self.name = "pad-into-conv2d"

    def added(self, match: Match) -> list[int] | str:
        pad = op_arguments(match.anchor)["input"]
        if not isinstance(pad, fx.Node) or pad.target not in (aten.pad.default, aten.constant_pad_nd.default):
            return "the input is not padded"
        padded = op_arguments(pad)
        if padded.get("mode", "constant") != "constant" or (padded.get("value") or 0) != 0:
            return f"pads with {padded.get('mode')} {padded.get('value')}, not zeros"
        amounts = list(padded["pad"])
        if len(amounts) != 4 or not all(isinstance(a, int) and a >= 0 for a in amounts):
            return f"pads {amounts}, not the last two dimensions"
        left, right, top, bottom = amounts
        if left != right or top != bottom:
            return f"pads {amounts}: not the same on both sides"
        return [top, left]

    def check(self, match: Match) -> str | None:
        added = self.added(match)
        return added if isinstance(added, str) else None

    def rewrite(self, match: Match) -> None:
        conv, (top, left) = op_arguments(match.anchor), self.added(match)
        padding = list(conv["padding"]) * (2 if len(conv["padding"]) == 1 else 1)
        args = (op_arguments(conv["input"])["self"], conv["weight"], conv["bias"], list(conv["stride"]),
                [padding[0] + top, padding[1] + left], list(conv["dilation"]), conv["groups"])
        with match.graph.inserting_before(match.anchor):
            folded = match.graph.call_function(aten.conv2d.default, args)
        folded.meta = dict(match.anchor.meta)
        match.anchor.replace_all_uses_with(folded)
        match.graph.erase_node(match.anchor)


def _changes_memory_format(node: fx.Node) -> str | None:
    memory_format = op_arguments(node).get("memory_format")
    if memory_format not in (None, torch.preserve_format):
        return f"changes memory format to {memory_format}"
    return None


def _written_in_place(source: Any, result: fx.Node) -> str | None:
    # A copy is only removable if neither side is written afterwards, directly or through a
    # view: otherwise the write would become visible through the other name.
    if not isinstance(source, fx.Node):
        return None
    for node in (source, result):
        for alias in aliases(node):
            writer = next((u for u in alias.users if is_mutating(u)), None)
            if writer is not None:
                return f"'{node.name}' is written in place by '{writer.name}'"
    return None


def _out_of_place_form(node: fx.Node) -> Any:
    """``aten.relu.default`` for ``aten.relu_.default``: the op with the same arguments that
    returns a new tensor, when ``node`` writes its first argument and nothing else."""
    schema = getattr(node.target, "_schema", None)
    packet = getattr(node.target, "overloadpacket", None)
    if node.op != "call_function" or schema is None or packet is None or not schema.is_mutable:
        return None
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_") or not schema.arguments:
        return None
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if len(written) != 1 or written[0] is not schema.arguments[0]:
        return None
    functional = getattr(getattr(torch.ops.aten, name[:-1], None), node.target._overloadname, None)
    functional_schema = getattr(functional, "_schema", None)
    if functional_schema is None or functional_schema.is_mutable:
        return None
    if [a.name for a in functional_schema.arguments] != [a.name for a in schema.arguments]:
        return None
    return functional


def _functionalize_in_place(gm: fx.GraphModule) -> int:
    """Rewrite in-place ops on fresh values into their out-of-place forms; returns how many."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    rewritten = 0
    for node in list(gm.graph.nodes):
        functional = _out_of_place_form(node)
        target = node.args[0] if node.args else None
        if functional is None or not isinstance(target, fx.Node) or target.op != "call_function":
            continue
        if returns_alias(target) or any(returns_alias(u) for u in target.users if u is not node):
            continue  # a view, or viewed: the write would be seen through another name
        with gm.graph.inserting_before(node):
            result = gm.graph.create_node("call_function", functional, node.args, node.kwargs,
                                          name=functional.overloadpacket.__name__)
        result.meta = dict(node.meta)
        order[result] = order[node]
        for later in [u for u in target.users if u is not node and order[u] > order[node]]:
            later.replace_input_with(target, result)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        rewritten += 1
    return rewritten


class DropAssertion(SingleOpRule):
    """_assert_*(...) -> (gone): export's runtime checks, not needed for inference"""

    def rewrite(self, match: Match) -> None:
        match.graph.erase_node(match.anchor)


CANONICALIZE_RULES = register_rule_set(
    RuleSet(
        "canonicalize",
        [
            *(DropoutInEval(op) for op in (aten.dropout.default, aten.feature_dropout.default,
                                           aten.alpha_dropout.default, aten.feature_alpha_dropout.default)),
            *(NoOpConversion(op) for op in (aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                                            aten._to_copy.default, aten.type_as.default)),
            *(IdentityCopy(op) for op in (aten.clone.default, aten.detach.default, aten.alias.default)),
            *(NothingPadded(op) for op in (aten.pad.default, aten.constant_pad_nd.default)),
            *(ExplicitConvPadding(op, default) for op, default in (
                (aten.conv1d.padding, aten.conv1d.default), (aten.conv2d.padding, aten.conv2d.default),
                (aten.conv3d.padding, aten.conv3d.default))),
            PadIntoConv(),
            *(DropAssertion(op) for op in (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                                           aten._assert_async.msg, aten.sym_constrain_range_for_size.default,
                                           aten.sym_constrain_range.default)),
        ],
    )
)

def _is_empty_constant(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` is a constant tensor of shape [0] (read directly or through a copy)."""
    while is_call(node, aten.lift_fresh_copy.default):
        node = op_arguments(node)["self"]
    value = constant_value(gm, node) if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.shape == (0,)


def _drop_empty_cat_operands(gm: fx.GraphModule) -> int:
    """cat([e, x, ...]) -> cat([x, ...]) (module doc); returns how many cats changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.cat.default):
            continue
        arguments = op_arguments(node)
        kept = [t for t in arguments["tensors"] if not _is_empty_constant(gm, t)]
        if len(kept) == len(arguments["tensors"]) or not kept:
            continue
        if len(kept) == 1:
            result, operand = node.meta.get("val"), kept[0].meta.get("val")
            if (not isinstance(result, torch.Tensor) or not isinstance(operand, torch.Tensor)
                    or operand.dtype != result.dtype or _written_in_place(kept[0], node)):
                continue  # the empty operand promoted the dtype, or the copy is written
            node.replace_all_uses_with(kept[0])
            gm.graph.erase_node(node)
        else:
            node.args = (kept, arguments["dim"])
            node.kwargs = {}
        changed += 1
    return changed


_GUARD_MODULE = "_guards_fn"  # the call_module torch.export adds to check input shapes


@dataclass(frozen=True)
class Canonicalize(Pass):
    name: ClassVar[str] = "canonicalize"
    establishes: ClassVar[frozenset[str]] = frozenset({"canonical"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict[str, int] = {}
        functionalized = _functionalize_in_place(gm)
        if functionalized:
            stats["out-of-place"] = functionalized
        stats.update(apply_rule_set(gm, CANONICALIZE_RULES, self.name))
        emptied = _drop_empty_cat_operands(gm)
        if emptied:
            stats["drop-empty-cat-operands"] = emptied
        guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == _GUARD_MODULE]
        for node in guards:
            gm.graph.erase_node(node)
        if guards:
            delattr(gm, _GUARD_MODULE)
            stats["drop-guards"] = len(guards)
        dead = remove_dead_nodes(gm)
        if dead:
            stats["dead-nodes"] = dead
        return PassResult(gm, bool(stats), stats)
