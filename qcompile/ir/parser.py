"""Canonical text IR back into a graph: tests start from literal IR.

    gm = parse_graph('''
        %x = input x : f32[4,16]
        %w = constant fc.weight : f32[8,16]
        %y = aten.linear.default(%x, %w, None) : f32[4,8]
        %r = aten.relu.default(%y) : f32[4,8]
        return (%r,)
    ''')

The grammar is what :func:`qcompile.ir.printer.print_graph` writes, so a dump pasted from a
run parses back to the same text (without its ``qc.*`` metadata, which is not read: a test sets
the metadata it needs, and a metadata block is refused unless ``ignore_meta=True``). Value
names may be the printer's numbers (``%3``) or any identifier (``%proj``), which becomes the fx
node's name, so a test can state what a pass prints with ``names="node"``.

* ``input NAME : TYPE`` is a placeholder; its value is a seeded random tensor of that type.
* ``constant A.B : TYPE`` is a tensor attribute: ``constants[A.B]`` if given, else seeded
  random (integers within their dtype's range, small non-negative for int64 / int32).
* ``NS.OP.OVERLOAD(args, k=v)`` calls ``torch.ops.NS.OP.OVERLOAD``; ``operator.NAME`` the
  Python operator. Arguments are literals (numbers, strings, ``None``, booleans, lists,
  tuples, ``torch.float32``-style dtypes, ``inf``) and earlier values.
* Symbolic sizes (``s0``) in input types take the sizes in ``sizes`` (default 3, 5, 7, ... in
  order of first appearance).

Every node runs once as it is built: its value becomes the node's ``val`` metadata, and a
declared type that differs from what the op computes is an error naming the line, so literal
IR cannot silently describe a graph other than the one it builds. Parsing never evaluates
text: arguments are read by ``ast`` into literals, and only ``torch.ops`` and ``operator``
callables are looked up.
"""

from __future__ import annotations

import ast
import operator
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from qcompile.errors import QCompileError
from qcompile.ir.printer import _DTYPE_ABBREVIATIONS, format_type

_DTYPES = {abbreviation: dtype for dtype, abbreviation in _DTYPE_ABBREVIATIONS.items()}
_TORCH_NAMES = {str(dtype): dtype for dtype in _DTYPE_ABBREVIATIONS} | {
    "torch.contiguous_format": torch.contiguous_format, "torch.channels_last": torch.channels_last,
    "torch.preserve_format": torch.preserve_format, "torch.strided": torch.strided,
}
_LINE = re.compile(r"^%(?P<name>[A-Za-z_0-9]+)\s*=\s*(?P<body>.*?)(?:\s*:\s*(?P<type>[^:{}]*?))?"
                   r"(?P<meta>\s{2}\{.*\})?$")
_VALUE = re.compile(r"%([A-Za-z_0-9]+)")
_TYPE = re.compile(r"^(?P<dtype>[a-z0-9]+)\[(?P<dims>[^\]]*)\]$")
_SYMBOL = re.compile(r"^[su]\d+$")


class IRParseError(QCompileError):
    """Literal IR that does not parse, or does not describe the graph it builds."""


def parse_graph(text: str, *, constants: Mapping[str, torch.Tensor] | None = None,
                sizes: Mapping[str, int] | None = None, seed: int = 0, ignore_meta: bool = False) -> fx.GraphModule:
    """The graph module ``text`` describes (see the module docstring)."""
    return _Parser(dict(constants or {}), dict(sizes or {}), seed, ignore_meta).parse(text)


def example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """The values a parsed graph's inputs were built with, in signature order."""
    return tuple(node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder")


class _Parser:
    def __init__(self, constants: dict[str, torch.Tensor], sizes: dict[str, int], seed: int, ignore_meta: bool):
        self.constants, self.sizes, self.ignore_meta = constants, sizes, ignore_meta
        self.generator = torch.Generator().manual_seed(seed)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.values: dict[str, fx.Node] = {}

    def parse(self, text: str) -> fx.GraphModule:
        lines = [(number, line.strip()) for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1)]
        lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
        if not lines or not lines[-1][1].startswith("return"):
            raise IRParseError("literal IR must end with a 'return' line")
        for number, line in lines[:-1]:
            try:
                self._line(line)
            except IRParseError as exc:
                raise IRParseError(f"line {number} '{line}': {exc}") from None
        number, line = lines[-1]
        try:
            self.graph.output(self._arguments(line.removeprefix("return").strip())[0][0])
        except IRParseError as exc:
            raise IRParseError(f"line {number} '{line}': {exc}") from None
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.lint()
        return gm

    def _line(self, line: str) -> None:
        match = _LINE.match(line)
        if match is None:
            raise IRParseError("expected '%name = body : type'")
        if match["meta"] and not self.ignore_meta:
            raise IRParseError("metadata is not read from literal IR (set it in the test, or pass ignore_meta=True)")
        name, body, declared = match["name"], match["body"].strip(), (match["type"] or "").strip()
        if name in self.values:
            raise IRParseError(f"%{name} is defined twice")
        node_name = name if name.isidentifier() else f"v{name}"
        if body.startswith("input "):
            node = self.graph.create_node("placeholder", body.removeprefix("input ").strip(), name=node_name)
            node.meta["val"] = self._random(declared)
        elif body.startswith("constant "):
            target = body.removeprefix("constant ").strip()
            value = self.constants.get(target)
            self._set_attribute(target, value if value is not None else self._random(declared))
            node = self.graph.create_node("get_attr", target, name=node_name)
            node.meta["val"] = _attribute(self.root, target)
        else:
            call = re.fullmatch(r"([A-Za-z_][\w.]*)\((.*)\)", body)
            if call is None:
                raise IRParseError("expected 'input NAME', 'constant NAME' or a call 'namespace.op.overload(...)'")
            function = _callable(call[1])
            args, kwargs = self._arguments(call[2])
            node = self.graph.create_node("call_function", function, tuple(args), kwargs, name=node_name)
            node.meta["val"] = self._run(function, args, kwargs)
        self.values[name] = node
        computed = format_type(node.meta["val"])
        if declared and not self._same_type(declared, computed):
            raise IRParseError(f"declared type {declared}, but the op computes {computed}")

    def _arguments(self, text: str) -> tuple[list[Any], dict[str, Any]]:
        source = _VALUE.sub(lambda m: f"__value_{m[1]}", text)
        try:
            call = ast.parse(f"f({source})", mode="eval").body
        except SyntaxError as exc:
            raise IRParseError(f"cannot read the arguments '{text}' ({exc.msg})") from None
        return [self._literal(a) for a in call.args], {k.arg: self._literal(k.value) for k in call.keywords}

    def _literal(self, tree: ast.AST) -> Any:
        if isinstance(tree, ast.Constant):
            return tree.value
        if isinstance(tree, ast.Name):
            if tree.id.startswith("__value_"):
                name = tree.id.removeprefix("__value_")
                if name not in self.values:
                    raise IRParseError(f"%{name} is used before it is defined")
                return self.values[name]
            if tree.id in ("inf", "nan"):
                return float(tree.id)
            if tree.id in ("cpu", "meta"):
                return torch.device(tree.id)
        if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
            return -self._literal(tree.operand)
        if isinstance(tree, (ast.List, ast.Tuple)):
            items = [self._literal(e) for e in tree.elts]
            return items if isinstance(tree, ast.List) else tuple(items)
        if isinstance(tree, ast.Dict):
            return {self._literal(k): self._literal(v) for k, v in zip(tree.keys, tree.values, strict=True)}
        if isinstance(tree, ast.Attribute):
            dotted = ast.unparse(tree)
            if dotted in _TORCH_NAMES:
                return _TORCH_NAMES[dotted]
        raise IRParseError(f"'{ast.unparse(tree)}' is not a literal or a value")

    def _run(self, function: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        def value(a: Any) -> Any:
            return a.meta["val"] if isinstance(a, fx.Node) else a

        args, kwargs = torch.utils._pytree.tree_map(value, (args, kwargs))
        try:
            with torch.no_grad():
                return function(*args, **kwargs)
        except Exception as exc:
            raise IRParseError(f"the op does not run on its inputs ({type(exc).__name__}: {exc})") from None

    def _shape(self, declared: str) -> tuple[torch.dtype, list[int]]:
        match = _TYPE.match(declared)
        if match is None or match["dtype"] not in _DTYPES:
            raise IRParseError(f"cannot read the tensor type '{declared}' (expected e.g. f32[4,16])")
        dims = []
        for d in filter(None, (d.strip() for d in match["dims"].split(","))):
            if _SYMBOL.match(d):
                dims.append(self.sizes.setdefault(d, 3 + 2 * len(self.sizes)))
            elif d.isdigit():
                dims.append(int(d))
            else:
                raise IRParseError(f"cannot read the size '{d}' in '{declared}'")
        return _DTYPES[match["dtype"]], dims

    def _random(self, declared: str) -> torch.Tensor:
        if not declared:
            raise IRParseError("an input or constant needs its type (e.g. ': f32[4,16]')")
        dtype, shape = self._shape(declared)
        if dtype.is_floating_point:
            return torch.randn(shape, generator=self.generator).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=self.generator).bool()
        low, high = (-127, 128) if dtype == torch.int8 else (0, 256) if dtype == torch.uint8 else (0, 4)
        return torch.randint(low, high, shape, generator=self.generator, dtype=dtype)

    def _set_attribute(self, target: str, value: torch.Tensor) -> None:
        *path, leaf = target.split(".")
        module = self.root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value)

    def _same_type(self, declared: str, computed: str) -> bool:
        """Types agree where the declared one's size expressions (``s0``, ``(s1//2)``,
        ``s0*s1``), with the symbols standing for the sizes they were given, equal the sizes
        the op computed."""
        def sizes(match: re.Match[str]) -> str:
            return "[" + ",".join(str(self._size(d)) for d in _split_dims(match[1])) + "]"

        return re.sub(r"\[([^\[\]]*)\]", sizes, declared).replace(" ", "") == computed.replace(" ", "")

    def _size(self, expression: str) -> int:
        try:
            return _arithmetic(ast.parse(expression.strip(), mode="eval").body, self.sizes)
        except (SyntaxError, IRParseError):
            raise IRParseError(f"cannot read the size '{expression}' (integer arithmetic on s0, s1, ... only)") from None


def _split_dims(text: str) -> list[str]:
    dims, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            dims.append(current)
            current = ""
        else:
            current += ch
    return [d for d in [*dims, current] if d.strip()]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod}


def _arithmetic(tree: ast.AST, sizes: Mapping[str, int]) -> int:
    """An integer size expression, symbols read from ``sizes``; nothing else is evaluated."""
    if isinstance(tree, ast.Constant) and isinstance(tree.value, int):
        return tree.value
    if isinstance(tree, ast.Name) and tree.id in sizes:
        return sizes[tree.id]
    if isinstance(tree, ast.BinOp) and type(tree.op) in _OPERATORS:
        return _OPERATORS[type(tree.op)](_arithmetic(tree.left, sizes), _arithmetic(tree.right, sizes))
    if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
        return -_arithmetic(tree.operand, sizes)
    raise IRParseError(ast.unparse(tree))


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _callable(name: str) -> Any:
    """``torch.ops.NS.OP.OVERLOAD`` or ``operator.NAME``: nothing else is looked up."""
    if name.startswith("operator."):
        function = getattr(operator, name.removeprefix("operator."), None)
        if callable(function):
            return function
        raise IRParseError(f"operator has no function '{name}'")
    parts = name.split(".")
    if len(parts) != 3:
        raise IRParseError(f"'{name}' is not an operator overload (namespace.op.overload)")
    namespace, op, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise IRParseError(f"no operator {name}") from None


__all__ = ["IRParseError", "example_inputs", "parse_graph"]
