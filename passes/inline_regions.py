"""inline-regions: the graph regions export wraps in a grad or autocast mode, inlined.

    outs = wrap_with_set_grad_enabled(enabled, region, *args)             ->  region's nodes, here
    outs = wrap_with_autocast(device, dtype, False, cache, region, *args)  ->  the same
    getitem(outs, i)                                                       ->  the region's i-th output

``torch.no_grad()`` and ``torch.autocast(enabled=False)`` blocks inside a model (transformers'
rotary embeddings compute cos and sin in both) are captured as higher-order ops over a
submodule. Calling one goes through the mode switch and torch._dynamo's guard on the submodule:
about 0.8 ms a call on a Zen 1, against 0.1 ms for the ops inside, once per decode step. Inlined,
the ops are the graph's own: every later pass sees and rewrites them (canonicalize drops their
no-op conversions), and they run without the switch.

A grad mode does not change values, and a compiled model runs without grad (QAT's training
graph, which must keep its no-grad blocks, does not run this pass). An autocast region inlines
only when it turns autocast off: its ops already carry the dtypes they run in; one that turns it
on would run them in another dtype once inlined, so it stays. Nested regions inline too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, add_submodule, fetch_attr
from qcompile.pipeline import Pass, PassResult

GRAD_MODE = torch.ops.higher_order.wrap_with_set_grad_enabled
AUTOCAST = torch.ops.higher_order.wrap_with_autocast


@dataclass(frozen=True)
class Region:
    """A wrapped region's call, read by what its arguments mean (the higher-order ops have no schema)."""

    node: fx.Node
    kind: str  # "grad" or "autocast"
    enabled: bool  # the mode the region runs in
    body: fx.Node  # the get_attr of its submodule
    args: tuple[Any, ...]

    @classmethod
    def of(cls, node: fx.Node) -> Region | None:
        if node.op != "call_function" or node.target not in (GRAD_MODE, AUTOCAST):
            return None
        if node.target is GRAD_MODE:
            enabled, body, *args = node.args
            kind = "grad"
        else:
            _device, _dtype, enabled, _cache, body, *args = node.args
            kind = "autocast"
        if not isinstance(body, fx.Node) or body.op != "get_attr":
            return None
        return cls(node, kind, bool(enabled), body, tuple(args))

    @property
    def inlinable(self) -> bool:
        """Its values are the same run inline (module doc), and only getitem reads its outputs."""
        plain = self.kind == "grad" or not self.enabled
        return plain and all(u.op == "call_function" and u.target is operator.getitem for u in self.node.users)


def _inline(gm: fx.GraphModule, region: Region) -> None:
    """Copy the region's nodes before its call, its constants and nested regions under fresh names."""
    body: fx.GraphModule = getattr(gm, str(region.body.target))
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    values: dict[fx.Node, Any] = dict(zip(placeholders, region.args, strict=True))
    outputs: tuple[Any, ...] = ()
    with gm.graph.inserting_before(region.node):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = tuple(fx.node.map_arg(node.args[0], values.__getitem__))
                continue
            if node.op == "get_attr":
                values[node] = _attribute(gm, body, node, f"{region.body.target}_{node.target}", before=region.node)
                continue
            values[node] = gm.graph.node_copy(node, values.__getitem__)
    for user in list(region.node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(region.node)
    if not region.body.users:
        gm.graph.erase_node(region.body)


def _attribute(gm: fx.GraphModule, body: fx.GraphModule, node: fx.Node, stem: str, *, before: fx.Node) -> fx.Node:
    """The region's get_attr ``node`` as one of ``gm``'s own: its constant, or its nested region's
    submodule, registered under a fresh name from ``stem``."""
    attribute = fetch_attr(body, str(node.target))
    stem = stem.replace(".", "_")
    if not isinstance(attribute, torch.nn.Module):
        return add_constant(gm, attribute, stem, before=before)
    name = add_submodule(gm, attribute, stem)
    with gm.graph.inserting_before(before):
        copied = gm.graph.get_attr(name)
    copied.meta = dict(node.meta)
    return copied


@dataclass(frozen=True)
class InlineRegions(Pass):
    name: ClassVar[str] = "inline-regions"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts: dict[str, int] = {}
        bodies: set[str] = set()
        while True:  # a region inlined may bring the regions nested in it
            regions = [r for n in gm.graph.nodes if (r := Region.of(n)) is not None and r.inlinable]
            if not regions:
                break
            for region in regions:
                bodies.add(str(region.body.target))
                _inline(gm, region)
                counts[region.kind] = counts.get(region.kind, 0) + 1
        still_read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for body in bodies - still_read:
            delattr(gm, body)
        return PassResult(gm, bool(counts), counts)
