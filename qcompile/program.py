"""The lowered graph as one native call: no Python frame per node when a compiled model runs.

An fx GraphModule runs its graph as generated Python code, one ``torch.ops`` call per node, and
each call parses its arguments against the operator's schema again: 5-7 us for a view, more for
an 11-argument kernel, where a boxed dispatcher call from C++ costs about 1 us. all-MiniLM's
lowered graph has about 170 operator calls and 200 parameter reads; at one request of 128
tokens that Python is about a quarter of the time.

:class:`NativeProgram` reads the graph once into a native ``Program`` (``csrc/program.cpp``):

* every placeholder, and every value a node returns, gets a slot;
* every operator node becomes an instruction: the operator's dispatcher handle and its argument
  stack, with constants (parameters read by ``get_attr``, literals, schema defaults, a Python
  number where a tensor goes as torch's own "wrapped number") converted once, and the slots the
  node-valued arguments come from. A list argument holding node values (a shape with a
  symbolic size, a tensor list) is assembled when the program runs;
* ``getitem`` of a multi-output operator is just the slot of that output; of a list result, an
  instruction that takes the item;
* a node that is no operator (a Python function such as ``operator.neg`` on a size, a submodule,
  a method) is called back in Python with the GIL, as the fx code would call it
  (``python_calls`` names them);
* each slot is cleared after its last reader, as the fx code sets dead names to None.

The program calls the same kernels in the same order with the same arguments as the graph's
code, so its outputs are the GraphModule's bit for bit; :meth:`NativeProgram.check_against`
verifies that on the example inputs when a model is compiled or loaded, and a program that
fails it, or a graph it cannot read, leaves the model on the GraphModule with the reason
(``QuantizedModel.runs_on``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.capture import written_buffers
from qcompile.native import _native
from qcompile.report import flat_inputs


class UnsupportedNode(Exception):
    """A node the native program cannot express; the message names it."""


@dataclass
class _Call:
    node: str
    op: torch._ops.OpOverload
    arguments: list[Any]
    slots: list[tuple[int, int]]
    lists: list[tuple[int, list[Any]]]
    outputs: list[int]
    reads: set[int] = field(default_factory=set)


@dataclass
class _Python:
    node: str
    function: Callable[..., Any]
    slots: list[int]
    output: int
    reads: set[int] = field(default_factory=set)


@dataclass
class _Item:
    node: str
    source: int
    index: int
    output: int
    reads: set[int] = field(default_factory=set)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _schema_arguments(node: fx.Node, schema: torch.FunctionSchema) -> list[Any]:
    """Every schema argument of ``node`` in order: positional ones, keywords, then defaults."""
    values = []
    for position, argument in enumerate(schema.arguments):
        if not argument.kwarg_only and position < len(node.args):
            values.append(node.args[position])
        elif argument.name in node.kwargs:
            values.append(node.kwargs[argument.name])
        elif argument.has_default_value():
            values.append(argument.default_value)
        else:
            raise UnsupportedNode(f"node '{node.name}' ({node.target}) has no value for argument '{argument.name}'")
    return values


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (a NaN equals the same NaN, which ``torch.equal`` denies)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in _BITS:
        a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
    return torch.equal(a, b)


def _holds_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


class NativeProgram:
    """``gm``'s graph as one native call; ``program(values)`` takes the placeholder values (as
    :func:`qcompile.report.flat_inputs` gives them) and returns what ``gm`` returns."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.code = gm.code  # the graph this program was read from (recompiling makes a new one)
        self._constants: dict[fx.Node, Any] = {}
        self._slots: dict[fx.Node, int | tuple[int, ...]] = {}
        self._list_results: set[int] = set()
        self._count = 0
        self.python_calls: list[str] = []  # nodes called back in Python, by name
        steps: list[_Call | _Item | _Python] = []
        output: fx.Node | None = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self._slots[node] = self._new_slot()
            elif node.op == "get_attr":
                self._constants[node] = _attribute(gm, node.target)
            elif node.op == "call_function" and node.target is operator.getitem:
                step = self._getitem(gm, node)
                if step is not None:
                    steps.append(step)
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                steps.append(self._call(gm, node))
            elif node.op == "output":
                output = node
            else:
                steps.append(self._python(gm, node))
        assert output is not None, "an fx graph has an output node"
        leaves, self._out_structure = pytree.tree_flatten(output.args[0])
        self._results: list[tuple[int, Any]] = [self._leaf(output, leaf) for leaf in leaves]
        info = getattr(gm.graph._codegen, "pytree_info", None)
        self._out_spec = info.out_spec if info is not None else None
        self._result_slots = [slot for slot, _ in self._results if slot >= 0]
        self._program = self._emit(steps, set(self._result_slots))

    def __len__(self) -> int:
        return len(self._program)

    def __call__(self, values: list[Any]) -> Any:
        computed = iter(self._program.run(values, self._result_slots))
        leaves = [next(computed) if slot >= 0 else constant for slot, constant in self._results]
        # An exported graph's output node returns the flat leaves of its out_spec.
        return pytree.tree_unflatten(leaves, self._out_spec or self._out_structure)

    def check_against(self, gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """:class:`UnsupportedNode` unless the program returns ``gm``'s outputs bit for bit on
        these inputs (the same kernels in the same order: anything else is a fault in reading the
        graph, and the model then stays on ``gm``). Both start from the state the buffers ``gm``
        writes hold now, and leave it so."""
        state = {name: gm.get_buffer(name) for name in written_buffers(gm)}
        initial = {name: value.clone() for name, value in state.items()}

        def restore() -> None:
            for name, value in state.items():
                value.copy_(initial[name])

        with torch.no_grad():
            try:
                expected = pytree.tree_leaves(gm(*args, **kwargs))
                restore()
                try:
                    actual = pytree.tree_leaves(self(flat_inputs(gm, args, kwargs)))
                except (RuntimeError, ValueError) as exc:
                    raise UnsupportedNode(f"the native program failed on the example inputs: {exc}") from exc
            finally:
                restore()
        same = len(expected) == len(actual) and all(
            isinstance(a, torch.Tensor) and _same_bits(a, e) if isinstance(e, torch.Tensor) else a == e
            for a, e in zip(actual, expected))
        if not same:
            raise UnsupportedNode("the native program's outputs differ from the graph's on the example inputs")

    def _new_slot(self) -> int:
        self._count += 1
        return self._count - 1

    def _value_slot(self, node: fx.Node, user: fx.Node) -> int:
        slot = self._slots.get(node)
        if not isinstance(slot, int):
            raise UnsupportedNode(f"node '{user.name}' reads '{node.name}', which is not a single value")
        return slot

    def _leaf(self, user: fx.Node, value: Any) -> tuple[int, Any]:
        """(slot, None) for a computed value, (-1, value) for a constant one."""
        if isinstance(value, fx.Node):
            if value in self._constants:
                return -1, self._constants[value]
            return self._value_slot(value, user), None
        return -1, value

    def _getitem(self, gm: fx.GraphModule, node: fx.Node) -> _Item | _Python | None:
        """An output of a multi-output operator is that output's slot; an item of a list result
        an instruction that takes it; anything else (a tensor indexed) a Python call."""
        source, index = node.args
        slot = self._slots.get(source)
        if isinstance(slot, tuple):
            self._slots[node] = slot[index]
            return None
        if slot is None or slot not in self._list_results or not isinstance(index, int):
            return self._python(gm, node)
        self._slots[node] = self._new_slot()
        return _Item(node.name, slot, index, self._slots[node], {slot})

    def _python(self, gm: fx.GraphModule, node: fx.Node) -> _Python:
        """A node that is no operator (a Python function, a submodule, a method): called back in
        Python with its node-valued arguments, as the fx code would call it."""
        if node.op == "call_module":
            target = _attribute(gm, node.target)
        elif node.op == "call_function":
            target = node.target
        elif node.op == "call_method":
            def target(this: Any, *args: Any, **kwargs: Any) -> Any:
                return getattr(this, node.target)(*args, **kwargs)
        else:
            raise UnsupportedNode(f"node '{node.name}' ({node.op} {node.target}) is not a call the program can make")
        inputs = [n for n in node.all_input_nodes if n not in self._constants]
        slots = [self._value_slot(n, node) for n in inputs]
        constants = self._constants

        def call(*values: Any) -> Any:
            found = dict(zip(inputs, values))
            args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                           lambda n: found[n] if n in found else constants[n])
            return target(*args, **kwargs)

        self._slots[node] = self._new_slot()
        return _Python(node.name, call, slots, self._slots[node], set(slots))

    def _call(self, gm: fx.GraphModule, node: fx.Node) -> _Call | _Python:
        op = node.target
        schema = op._schema
        arguments = _schema_arguments(node, schema)
        if any(isinstance(v, (list, tuple)) and any(isinstance(i, (list, tuple, dict)) and _holds_node(i) for i in v)
               for v in arguments):
            return self._python(gm, node)  # node values nested deeper than one list
        call = _Call(node.name, op, [], [], [], [])
        for position, value in enumerate(arguments):
            if isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
                items = []
                for item in value:
                    slot, constant = self._leaf(node, item)
                    items.append(slot if slot >= 0 else ("constant", constant))
                    if slot >= 0:
                        call.reads.add(slot)
                call.lists.append((position, items))
                call.arguments.append(None)
                continue
            slot, constant = self._leaf(node, value)
            if slot >= 0:
                call.slots.append((position, slot))
                call.reads.add(slot)
            call.arguments.append(constant if slot < 0 else None)
        returns = schema.returns
        if len(returns) == 1:
            self._slots[node] = self._new_slot()
            call.outputs = [self._slots[node]]
            if isinstance(returns[0].type, torch.ListType):
                self._list_results.add(self._slots[node])
        else:
            self._slots[node] = tuple(self._new_slot() for _ in returns)
            call.outputs = list(self._slots[node])
        return call

    def _emit(self, steps: list[_Call | _Item | _Python], kept: set[int]) -> Any:
        """The native program, each slot released by its last reader (a value nobody reads: by
        the step that made it)."""
        last: dict[int, int] = {}
        for index, step in enumerate(steps):
            for slot in step.outputs if isinstance(step, _Call) else [step.output]:
                last[slot] = index
            for slot in step.reads:
                last[slot] = index
        release: dict[int, list[int]] = {}
        for slot, index in last.items():
            if slot not in kept:
                release.setdefault(index, []).append(slot)
        program = _native.Program(self._count)
        for index, step in enumerate(steps):
            if isinstance(step, _Item):
                program.item(step.node, step.source, step.index, step.output, release.get(index, []))
                continue
            if isinstance(step, _Python):
                program.python(step.node, step.function, step.slots, step.output, release.get(index, []))
                self.python_calls.append(step.node)
                continue
            schema = step.op._schema
            try:
                program.call(step.node, schema.name, schema.overload_name, step.arguments, step.slots, step.lists,
                             step.outputs, release.get(index, []))
            except (RuntimeError, TypeError, ValueError) as exc:
                raise UnsupportedNode(f"node '{step.node}' ({step.op}): {exc}") from exc
        return program

