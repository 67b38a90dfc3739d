"""Canonical text IR.

The text of a graph is what dumps, graph-diff tests, the ``modified`` check and error messages
compare, so it must be identical for identical graphs, whatever order nodes were inserted in
and whatever names fx or the shape environment happened to choose:

* nodes are numbered ``%0, %1, ...`` in a canonical topological order: inputs in signature order,
  then a post-order walk from the outputs (arguments left to right), then any node the outputs
  do not reach (side effects such as assertions);
* symbolic sizes are renamed ``s0, s1, ...`` in order of first appearance;
* each line ends with the value's dtype and shape and qcompile's own ``qc.*`` metadata, sorted
  by key.

``names="node"`` prints fx node names instead of numbers. Node names survive the pass
manager's per-pass copies, so diffs between two stages of one pipeline stay local.
"""

from __future__ import annotations

import difflib
import operator
import re
from typing import Any, Literal

import torch
from torch import fx

from qcompile.ir.meta import PROVENANCE_KEY, qc_meta

_DTYPE_ABBREVIATIONS = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.float8_e4m3fn: "f8e4m3fn",
    torch.float8_e5m2: "f8e5m2",
}
_SYMBOL = re.compile(r"\b[su]\d+\b")

NameStyle = Literal["canonical", "node"]


def canonical_order(graph: fx.Graph) -> list[fx.Node]:
    """All nodes in the canonical topological order described in the module docstring."""
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(root: fx.Node) -> None:
        # Iterative post-order: graphs of 16k nodes would overflow Python's recursion limit.
        stack: list[tuple[fx.Node, bool]] = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node in seen:
                continue
            if inputs_done:
                seen.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            for inp in reversed(node.all_input_nodes):
                if inp not in seen:
                    stack.append((inp, False))

    nodes = list(graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            visit(node)
    output = next((n for n in reversed(nodes) if n.op == "output"), None)
    if output is not None:
        # Outputs first so that their inputs get the low numbers in argument order.
        for inp in output.all_input_nodes:
            visit(inp)
    for node in nodes:
        if node is not output:
            visit(node)
    if output is not None:
        order.append(output)
    return order


def canonical_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """``%N`` for every node but the output, in canonical order."""
    numbered = [n for n in canonical_order(graph) if n.op != "output"]
    return {node: f"%{i}" for i, node in enumerate(numbered)}


def format_target(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(target)
        module = getattr(target, "__module__", None) or ""
        if module == "_operator" or getattr(operator, getattr(target, "__name__", ""), None) is target:
            module = "operator"
        return f"{module}.{getattr(target, '__qualname__', repr(target))}"
    if node.op == "call_module":
        return f"module[{target}]"
    if node.op == "call_method":
        return f"method[{target}]"
    return str(target)


def format_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dtype = _DTYPE_ABBREVIATIONS.get(val.dtype, str(val.dtype).removeprefix("torch."))
        return f"{dtype}[{','.join(str(d) for d in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "sym_int"
    if isinstance(val, torch.SymFloat):
        return "sym_float"
    if isinstance(val, torch.SymBool):
        return "sym_bool"
    if val is None:
        return ""
    return type(val).__name__


def _format_arg(arg: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(arg, fx.Node):
        return names.get(arg, f"%<dangling {arg.name}>")
    if isinstance(arg, list):
        return "[" + ", ".join(_format_arg(a, names) for a in arg) + "]"
    if isinstance(arg, tuple):
        inner = ", ".join(_format_arg(a, names) for a in arg)
        return f"({inner},)" if len(arg) == 1 else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v, names)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(arg)
    if isinstance(arg, float):
        return repr(arg)
    return repr(arg)


def _format_call(node: fx.Node, names: dict[fx.Node, str]) -> str:
    parts = [_format_arg(a, names) for a in node.args]
    parts += [f"{k}={_format_arg(v, names)}" for k, v in node.kwargs.items()]
    return f"{format_target(node)}({', '.join(parts)})"


def describe_producer(node: fx.Node) -> str:
    """What made a value, as the text IR words it: ``input x``, ``constant fc.weight`` or the op."""
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "get_attr":
        return f"constant {node.target}"
    return format_target(node)


def _format_node(node: fx.Node, names: dict[fx.Node, str], show_provenance: bool) -> str:
    if node.op == "output":
        return f"return {_format_arg(node.args[0], names)}"
    if node.op in ("placeholder", "get_attr"):
        body = describe_producer(node)
    else:
        body = _format_call(node, names)
    line = f"{names[node]} = {body}"
    type_text = format_type(node.meta.get("val"))
    if type_text:
        line += f" : {type_text}"
    meta = qc_meta(node)
    if not show_provenance:
        meta.pop(PROVENANCE_KEY, None)
    if meta:
        line += "  {" + ", ".join(f"{k}={v}" for k, v in meta.items()) + "}"
    return line


def print_graph(
    graph_or_module: fx.Graph | fx.GraphModule,
    *,
    names: NameStyle = "canonical",
    show_provenance: bool = False,
) -> str:
    """The canonical text of a graph (see the module docstring)."""
    graph = graph_or_module.graph if isinstance(graph_or_module, fx.GraphModule) else graph_or_module
    order = canonical_order(graph)
    if names == "canonical":
        value_names = canonical_names(graph)
    else:
        value_names = {n: f"%{n.name}" for n in order if n.op != "output"}
    lines = [_format_node(n, value_names, show_provenance) for n in order]
    return _rename_symbols("\n".join(lines)) + "\n"


def _rename_symbols(text: str) -> str:
    # Shape-environment symbols (s77, u3) differ from run to run; their order of first
    # appearance in canonical text does not.
    mapping: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        symbol = match.group(0)
        if symbol not in mapping:
            mapping[symbol] = f"{symbol[0]}{sum(1 for s in mapping if s[0] == symbol[0])}"
        return mapping[symbol]

    out_lines = []
    for line in text.splitlines():
        head, sep, type_text = line.partition(" : ")
        # Only inside shape brackets: "u8[u3,16]" has a dtype u8 and a symbol u3.
        renamed = re.sub(r"\[[^\]]*\]", lambda m: _SYMBOL.sub(rename, m.group(0)), type_text)
        out_lines.append(head + sep + renamed if sep else line)
    return "\n".join(out_lines)


def diff_graphs(
    before: fx.Graph | fx.GraphModule,
    after: fx.Graph | fx.GraphModule,
    *,
    context: int = 1,
    names: NameStyle = "node",
) -> str:
    """A unified diff of two graphs' text; empty when they print the same."""
    a = print_graph(before, names=names).splitlines()
    b = print_graph(after, names=names).splitlines()
    return "\n".join(
        difflib.unified_diff(a, b, fromfile="before", tofile="after", n=context, lineterm="")
    )


def changed_lines(
    before: fx.Graph | fx.GraphModule, after: fx.Graph | fx.GraphModule
) -> tuple[list[str], list[str]]:
    """(added, removed) lines between two graphs, by node name, ignoring unchanged ones."""
    a = print_graph(before, names="node").splitlines()
    b = print_graph(after, names="node").splitlines()
    added, removed = [], []
    for line in difflib.ndiff(a, b):
        if line.startswith("+ "):
            added.append(line[2:])
        elif line.startswith("- "):
            removed.append(line[2:])
    return added, removed
