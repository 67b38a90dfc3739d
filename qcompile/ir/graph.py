"""Graph helpers shared by the pass manager and by passes.

The pass manager gives every pass its own copy of the graph while sharing parameters, so the
helpers here that add tensors register them on that copy only (never on a shared submodule),
and give new nodes the fake ``val`` metadata later passes rely on.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

M = TypeVar("M", bound=torch.nn.Module)

from qcompile.ir.meta import Provenance, set_provenance, source_line, source_module
from qcompile.ir.printer import canonical_names, format_target


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its tensors and submodules.

    Node names, metadata (shallow-copied per node) and the pytree calling convention survive.
    Containers on the path to a shared tensor are new modules, so registering a new attribute
    on the copy, at any depth, leaves ``gm`` as it was.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    copied = graph.graph_copy(gm.graph, val_map={}, return_output_node=True)
    # The calling convention (pytree specs) is never edited by a pass, so the copy shares it.
    graph._codegen = gm.graph._codegen
    if copied is not None:
        output_value, old_output = copied
        new_output = graph.output(output_value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__.removesuffix("Impl") or "GraphModule")
    new.meta.update(gm.meta)
    return new


def named_tensors(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable as a get_attr target, parameters and buffers included."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                yield node.target, value


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        if not hasattr(value, atom):
            raise AttributeError(f"get_attr target '{target}' does not exist on the graph module")
        value = getattr(value, atom)
    return value


def constant_value(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The real tensor behind a get_attr node, or None when ``node`` is not a constant."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def constant_expression(gm: fx.GraphModule, node: Any, memo: dict[fx.Node, Any] | None = None) -> Any:
    """The value of ``node`` when it is computed from constants alone (get_attr and ATen calls:
    a pruned weight ``mul(W, mask)``, a weight scaled for folding), else None; non-node arguments
    are themselves. ``memo`` shares the values computed between calls."""
    memo = {} if memo is None else memo
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    value = None
    if node.op == "get_attr":
        value = constant_value(gm, node)
        value = value.detach() if value is not None else None
    elif (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
          and not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags):
        args, kwargs = pytree.tree_map(lambda a: constant_expression(gm, a, memo), (node.args, node.kwargs))
        if all(memo.get(a) is not None for a in node.all_input_nodes):
            with torch.no_grad():
                value = node.target(*args, **kwargs)
    memo[node] = value
    return value


def _fake_mode(graph: fx.Graph) -> FakeTensorMode | None:
    # The first fake value decides: all of a graph's values share export's one fake mode, and
    # scanning every node per call would make passes that add constants quadratic.
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, name_hint: str, *, before: fx.Node) -> fx.Node:
    """Register ``tensor`` on ``gm`` under a fresh top-level name and return its get_attr node."""
    base = re.sub(r"\W", "_", name_hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    fake_mode = _fake_mode(gm.graph)
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor.detach()
    return node


def reread_constant(gm: fx.GraphModule, constant: fx.Node, *, before: fx.Node) -> fx.Node:
    """A get_attr of ``constant``'s tensor placed before ``before``: a fused call takes the place
    of its first node, which may come before the get_attr of a constant it now reads."""
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(constant.target)
    node.meta.update(constant.meta)
    return node


def called_module(gm: fx.GraphModule, node: object, kind: type[M]) -> M | None:
    """The submodule of type ``kind`` that ``node`` calls, or None (another node, or another module)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, kind):
            return module
    return None


def add_submodule(gm: fx.GraphModule, module: torch.nn.Module, stem: str, start: int = 0) -> str:
    """Register ``module`` on ``gm`` as ``{stem}_{i}``, the first free ``i`` from ``start``, and
    return the name: the one place passes pick names for the modules they add (observers,
    fake-quants, mode switches)."""
    number = start
    while hasattr(gm, f"{stem}_{number}"):
        number += 1
    gm.add_submodule(f"{stem}_{number}", module)
    return f"{stem}_{number}"


def infer_fake_value(node: fx.Node) -> Any:
    """Run ``node``'s target on its inputs' fake values and store the result as ``meta['val']``.

    Passes that create call_function nodes call this so that every node keeps a shape and dtype.
    """
    fake_mode = _fake_mode(node.graph)

    def to_val(arg: Any) -> Any:
        return arg.meta["val"] if isinstance(arg, fx.Node) else arg

    args = pytree.tree_map(to_val, node.args)
    kwargs = pytree.tree_map(to_val, node.kwargs)
    if fake_mode is None:
        value = node.target(*args, **kwargs)
    else:
        with fake_mode:
            value = node.target(*args, **kwargs)
    node.meta["val"] = value
    return value


def insert_call(
    gm: fx.GraphModule,
    target: Any,
    args: tuple[Any, ...],
    *,
    before: fx.Node,
    provenance: Provenance,
    meta_from: fx.Node | None = None,
    kwargs: dict[str, Any] | None = None,
) -> fx.Node:
    """A new call before ``before`` with what every added node owes later passes: its fake value,
    its provenance and, when it stands for ``meta_from``, that node's user-module metadata."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    infer_fake_value(node)
    if meta_from is not None:
        copy_source_meta(meta_from, node)
    set_provenance(node, provenance)
    return node


def copy_source_meta(source: fx.Node, target: fx.Node) -> None:
    """Give a replacement node the user-module provenance of the node it stands for."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in source.meta:
            target.meta[key] = source.meta[key]


def describe_node(node: fx.Node) -> str:
    """How errors name a node: canonical number, fx name, target and the user module."""
    try:
        canonical = canonical_names(node.graph).get(node, "%?")
    except Exception:  # a graph broken enough to fail numbering still deserves a message
        canonical = "%?"
    text = f"{canonical} ({node.name}: {format_target(node)})"
    module = source_module(node)
    if module is not None:
        path, type_name = module
        text += f" from module '{path or '<root>'}' ({type_name})"
    line = source_line(node)
    if line:
        text += f" at {line}"
    return text


def is_call(node: object, target: object) -> bool:
    """Whether ``node`` is a graph node calling ``target``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name, defaults filled in, however the call spelled them."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"{describe_node(node)} is not a call to an ATen operator")
    arguments: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if arg.name in node.kwargs:
            arguments[arg.name] = node.kwargs[arg.name]
        elif not arg.kwarg_only and i < len(node.args):
            arguments[arg.name] = node.args[i]
        else:
            arguments[arg.name] = arg.default_value
    return arguments


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Replace a call's argument by schema name, wherever the call spelled it (keyword or position)."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def is_mutating(node: fx.Node) -> bool:
    """Whether a node writes into one of its inputs (``add_``, ``copy_``, ``detach_``...)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def returns_alias(node: fx.Node) -> bool:
    """Whether a node's result may share storage with an input (a view: ``view``, ``select``,
    ``add_``...). An item of a multi-output op is judged by that op (``split``'s pieces are
    views); a call without a schema is assumed to alias, since nothing says it does not."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return returns_alias(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(ret.alias_info is not None for ret in schema.returns)


def aliases(node: fx.Node) -> list[fx.Node]:
    """``node`` and every value that views its storage: a write into any of them writes into all."""
    found, frontier = [node], [node]
    while frontier:
        for user in frontier.pop().users:
            if returns_alias(user) and user not in found:
                found.append(user)
                frontier.append(user)
    return found


# Calls that change interpreter state rather than return a value: functorch's vmap nesting
# level, which a vmapped computation (transformers' causal-mask builder) enters and leaves
# around the ops it batches. Nothing reads their results, yet removing them leaves the batched
# ops running at the wrong level ("your tensor may have escaped from inside a function being
# vmapped"), so they are side effects, kept like in-place ops.
STATEFUL_CALLS = frozenset({
    torch._functorch.predispatch._vmap_increment_nesting,
    torch._functorch.predispatch._vmap_decrement_nesting,
    torch._functorch.predispatch.lazy_load_decompositions,
})


def is_side_effect(node: fx.Node) -> bool:
    """Whether a node must run even when nothing reads its result."""
    return node.is_impure() or (node.op == "call_function" and node.target in STATEFUL_CALLS)


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Remove values nothing uses (side effects, in-place ops and :data:`STATEFUL_CALLS` stay);
    returns how many.

    Tensors no get_attr reads any more are dropped from ``gm`` too, so a converted model does
    not carry the float weights its int8 ones replaced. ``gm`` is a pass's own copy, whose
    containers are its own, so the graph the pass was given keeps them. The tensors of modules
    the graph calls (a fake-quant's scale) are theirs, not constants: those modules are shared
    with the graph the pass was given, which must keep them whole.
    """
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=is_side_effect)
    referenced = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in referenced and not name.startswith(called):
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if not isinstance(module, torch.nn.Module) or attr not in {**module._parameters, **module._buffers}:
                continue
            delattr(module, attr)
    return before - len(gm.graph.nodes)
