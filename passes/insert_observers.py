"""insert-observers: put an observer on every activation the plan quantizes.

    y = producer(...)                 y = producer(...)
    z = view(y)            ->         o = call_module observer_0(y)
    linear(z, W, b)                   z = view(o)
                                      linear(z, W, b)

One observer per (observed value, spec): the three projections reading one LayerNorm output
share it, so they get the same qparams and one quantize. A node whose plan quantizes its own
output (``QuantAnnotation.output``) gets an observer after it (after the epilogue ops its
``observe_at`` names), which its readers read. Only the edges the plan quantizes read
the observer; other users of the value keep reading it directly. Weights are not observed
here: they are constants, and ``convert`` measures them directly.

Observers are fresh modules registered on this pass's copy of the graph, so the graph given to
the pass, and any other copy, never sees calibration state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from qcompile.ir.graph import add_submodule
from qcompile.ir.meta import Provenance, get_qspec, set_provenance, source_module
from qcompile.observers import Observer, make_observer
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import observation_root


def _is_observer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), Observer)


def _reads_with_another_spec(user: fx.Node, node: fx.Node, spec: object) -> bool:
    """Whether ``user`` plans its edge from ``node`` with a spec of its own (it gets its own observer)."""
    plan = get_qspec(user)
    return plan is not None and any(other != spec for other in plan.activation_specs_from(user, node))


@dataclass(frozen=True)
class InsertObservers(Pass):
    name: ClassVar[str] = "insert-observers"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    establishes: ClassVar[frozenset[str]] = frozenset({"observed"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        observers: dict[tuple[fx.Node, object], fx.Node] = {}
        by_name = {node.name: node for node in gm.graph.nodes}
        for node in list(gm.graph.nodes):
            plan = get_qspec(node)
            if plan is None or not plan.quantized:
                continue
            end = by_name.get(plan.output.observe_at or node.name) if plan.output is not None else None
            if end is not None and not any(_is_observer(gm, user) for user in end.users):
                observers[(end, plan.output.spec)] = observer = self._observe(gm, end, plan.output.spec, len(observers))
                for user in list(end.users):
                    if user is not observer and not _reads_with_another_spec(user, end, plan.output.spec):
                        user.replace_input_with(end, observer)
            for index, edge in plan.inputs:
                if edge.role != "activation" or edge.spec.dynamic:
                    continue  # per-token scales are computed at run time, not observed
                root, chain = observation_root(node.args[index])
                if _is_observer(gm, root):
                    continue  # already observed: running the pass twice changes nothing
                key = (root, edge.spec)
                if key not in observers:
                    observers[key] = self._observe(gm, root, edge.spec, len(observers))
                (chain[0] if chain else node).replace_input_with(root, observers[key])
        return PassResult(gm, bool(observers), {"observers": len(observers)} if observers else {})

    def _observe(self, gm: fx.GraphModule, root: fx.Node, spec: object, number: int) -> fx.Node:
        module = source_module(root)
        where = f"{root.name} in module '{module[0]}'" if module and module[0] else root.name
        name = add_submodule(gm, make_observer(spec, name=where), "observer", start=number)
        with gm.graph.inserting_after(root):
            node = gm.graph.call_module(name, (root,))
        node.meta["val"] = root.meta.get("val")
        set_provenance(node, Provenance(self.name, sources=(root.name,)))
        return node
