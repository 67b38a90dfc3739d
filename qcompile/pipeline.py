"""Passes and pipelines as data: the vocabulary the pass manager and every instrument share.

A pass is a pure function from the outside: ``PassResult(graph_module, modified, stats,
diagnostics)`` from a graph module it never changes. Pipelines are data: a list of pass instances that prints to and
parses from ``"canonicalize,fold-batchnorm{opt=1}"``, and whose order is checked against each
pass's ``requires`` / ``establishes`` / ``invalidates`` before anything runs. Everything that
observes a run is an :class:`Instrument` with four hooks; the instruments live in
:mod:`qcompile.instruments`, the manager that runs pipelines in :mod:`qcompile.pass_manager`,
and both import this module, not each other.

Pass names are looked up in one explicit registry: the built-in passes listed in
:data:`qcompile.passes.BUILTIN_PASSES`, each registered target's own passes, and user passes
given to :func:`register_pass`. Defining a class registers nothing; a class that takes a
registered name is refused when it is defined.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx

from qcompile.errors import PipelineOrderError, PipelineParseError
from qcompile.ir.graph import copy_graph_module

if TYPE_CHECKING:
    from qcompile.context import CompileContext

_KEBAB_CASE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_PASS_REGISTRY: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Diagnostic:
    """What a pass wants the user to know about one node: ``kind`` says what sort of finding it
    is (``unsupported``: a rule asked for a format the target cannot run; ``kept``: a lowering
    left the node as reference Q/DQ; ``narrowed``: a weight planned narrower than asked, so the
    kernel computes it exactly; ``calibration``: something calibration saw), ``reason``
    why, in words."""

    node: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: tuple[Diagnostic, ...] = ()

    def of_kind(self, kind: str) -> dict[str, str]:
        """The reasons of this result's diagnostics of one kind, by node name."""
        return {d.node: d.reason for d in self.diagnostics if d.kind == kind}


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses whose fields are their options.

    Class attributes declare the contract:

    * ``name``: kebab-case, unique; the pass's name in pipeline text, dumps and errors.
    * ``requires`` / ``establishes`` / ``invalidates``: graph properties (``bn-folded``,
      ``annotated``, ...) the manager uses to check a pipeline's order.
    * ``preserves_semantics``: the pass claims outputs are unchanged, so ``NumericCheck``
      compares the graph's outputs before and after it.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    establishes: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    preserves_semantics: ClassVar[bool] = False
    # The pass decides the plan (annotate, or one that revises it): the graph after the last such
    # pass is the compile context's snapshot "plan", which the report and the saved plan read.
    decides_plan: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr in ("requires", "establishes", "invalidates"):
            setattr(cls, attr, frozenset(getattr(cls, attr)))
        name = cls.__dict__.get("name")
        if name:
            if not _KEBAB_CASE.match(name):
                raise ValueError(f"pass name '{name}' of {cls.__qualname__} must be kebab-case")
            # A second class under a registered name would be a different pass printed and
            # dumped under the first one's name. (The same class defined again, as a module
            # reload does, is the same pass.)
            _check_name_free(cls)

    def call(self, gm: fx.GraphModule) -> PassResult:
        """Transform ``gm``, which is this pass's own copy, and say whether anything changed."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement call()")

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        """How the pass manager runs the pass. A pass that reads the compile context (the
        target, the QConfig, the calibration data) overrides this to bind what it reads into
        its options and then runs as itself, so its result is still a function of its options
        and its graph; a pass that needs no context just runs."""
        return self(gm)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        """Run the pass on its own copy of ``gm`` and recompile."""
        result = self.call(copy_graph_module(gm))
        if not isinstance(result, PassResult):
            raise TypeError(f"call() returned {type(result).__name__}, not PassResult")
        result.graph_module.recompile()
        return result

    def __str__(self) -> str:
        options = []
        if dataclasses.is_dataclass(self):
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if value != default:
                    options.append(f"{f.name}={_format_option(value)}")
        return self.name + ("{" + ",".join(options) + "}" if options else "")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_name_free(cls: type[Pass]) -> None:
    taken = _PASS_REGISTRY.get(cls.name)
    if taken is not None and _qualified(taken) != _qualified(cls):
        raise ValueError(f"pass name '{cls.name}' of {_qualified(cls)} is already taken by {_qualified(taken)}; "
                         "give the new pass a name of its own")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make ``cls`` reachable by name in pipeline text (usable as a class decorator). Built-in
    passes are registered from their lists; a user pass is registered only by this call, and
    one whose name is taken is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.__dict__.get("name"):
        raise TypeError(f"register_pass takes a Pass subclass with a name of its own, got {cls!r}")
    _check_name_free(cls)
    _PASS_REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass reachable by name, built-in or user-registered."""
    return dict(_PASS_REGISTRY)


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_option(pass_cls: type[Pass], key: str, text: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(pass_cls)} if dataclasses.is_dataclass(pass_cls) else {}
    if key not in fields:
        raise PipelineParseError(
            f"pass '{pass_cls.name}' has no option '{key}' (options: {', '.join(fields) or 'none'})"
        )
    hints = typing.get_type_hints(pass_cls)
    kind = hints.get(key, str)
    optional = type(None) in typing.get_args(kind)
    if optional and text != "None" and [a for a in typing.get_args(kind) if a is not type(None)] == [bool]:
        kind = bool  # ``bool | None``: None is "decide for me", spelled None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if kind in (int, float, str):
            return kind(text)
        # Optional scalars, e.g. ``float | None``.
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text == "None" and optional:
            return None
        if len(args) == 1 and args[0] in (int, float, str):
            return args[0](text)
    except ValueError as exc:
        raise PipelineParseError(f"option '{key}' of pass '{pass_cls.name}': cannot read '{text}' as {kind}") from exc
    raise PipelineParseError(f"option '{key}' of pass '{pass_cls.name}' has type {kind}, which pipeline text cannot express")


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineParseError(f"unbalanced '}}' in pipeline text '{text}'")
        if ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise PipelineParseError(f"unbalanced '{{' in pipeline text '{text}'")
    parts.append("".join(current))
    parts = [p.strip() for p in parts]
    if parts == [""]:
        return []
    if "" in parts:
        raise PipelineParseError(f"empty entry {parts.index('') + 1} in '{text}' (two separators in a row, or one "
                                 "at an end)")
    return parts


def parse_pass(text: str) -> Pass:
    match = re.fullmatch(r"\s*([a-z0-9-]+)\s*(?:\{(.*)\})?\s*", text, re.S)
    if not match:
        raise PipelineParseError(f"cannot parse pass '{text}': expected name or name{{key=value,...}}")
    name, options_text = match.groups()
    registry = _PASS_REGISTRY
    if name not in registry:
        raise PipelineParseError(f"unknown pass '{name}' (known passes: {', '.join(sorted(registry))})")
    cls = registry[name]
    options = {}
    for item in _split_top_level(options_text or "", ","):
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineParseError(f"option '{item}' of pass '{name}' needs the form key=value")
        if key.strip() in options:
            raise PipelineParseError(f"option '{key.strip()}' of pass '{name}' is given twice")
        options[key.strip()] = _parse_option(cls, key.strip(), value.strip())
    return cls(**options)


class Pipeline:
    """An ordered, editable list of pass instances; text in, text out."""

    def __init__(self, passes: Iterable[Pass] = ()):
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"pipeline entries must be Pass instances, got {p!r}")

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        return cls(parse_pass(part) for part in _split_top_level(text, ","))

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline('{self}')"

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, index: int) -> Pass:
        return self.passes[index]

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def index(self, name: str) -> int:
        for i, p in enumerate(self.passes):
            if p.name == name:
                return i
        raise KeyError(f"no pass '{name}' in pipeline '{self}'")

    def insert_after(self, name: str, new_pass: Pass) -> Pipeline:
        self.passes.insert(self.index(name) + 1, new_pass)
        return self

    def insert_before(self, name: str, new_pass: Pass) -> Pipeline:
        self.passes.insert(self.index(name), new_pass)
        return self

    def replace(self, name: str, new_pass: Pass) -> Pipeline:
        self.passes[self.index(name)] = new_pass
        return self

    def remove(self, name: str) -> Pipeline:
        del self.passes[self.index(name)]
        return self

    def check_order(self, initial_properties: Iterable[str] = ()) -> None:
        """Refuse a pipeline whose passes' requirements are not met at their position."""
        available = set(initial_properties)
        invalidated_by: dict[str, str] = {}
        problems = []
        for i, p in enumerate(self.passes):
            for prop in sorted(p.requires - available):
                later = next((q for q in self.passes[i + 1 :] if prop in q.establishes), None)
                if prop in invalidated_by:
                    problems.append(
                        f"'{p.name}' requires '{prop}', which '{invalidated_by[prop]}' invalidates "
                        f"before it runs; re-establish it or move '{p.name}' earlier"
                    )
                elif later is not None:
                    problems.append(
                        f"'{p.name}' requires '{prop}', established by '{later.name}', which runs "
                        f"after it; move '{later.name}' before '{p.name}'"
                    )
                else:
                    problems.append(f"'{p.name}' requires '{prop}', which no pass in the pipeline establishes")
            for prop in p.invalidates:
                available.discard(prop)
                invalidated_by[prop] = p.name
            for prop in p.establishes:
                available.add(prop)
                invalidated_by.pop(prop, None)
        if problems:
            raise PipelineOrderError(f"pipeline '{self}' is out of order:\n  " + "\n  ".join(problems))

    def properties_after(self, initial_properties: Iterable[str] = ()) -> set[str]:
        """The graph properties that hold after this pipeline: where the next stage starts."""
        available = set(initial_properties)
        for p in self.passes:
            available = (available - p.invalidates) | p.establishes
        return available


class Instrument:
    """Hooks around every pass; override what you need. ``should_run`` False skips a pass."""

    def enter_pipeline(self, pipeline: Pipeline, gm: fx.GraphModule) -> None: ...

    def should_run(self, p: Pass, index: int) -> bool:
        return True

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None: ...

    def run_after_pass(self, p: Pass, before: fx.GraphModule, result: PassResult, index: int) -> None: ...

    def exit_pipeline(self, result: PipelineResult) -> None: ...


@dataclass
class PassRecord:
    index: int
    name: str
    text: str
    skipped: bool = False
    modified: bool = False
    seconds: float = 0.0
    stats: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: tuple[Diagnostic, ...] = ()


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    modified: bool
    records: list[PassRecord]
    history: list[fx.GraphModule] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{'#':>3}  {'pass':<28}{'changed':<9}{'ms':>9}  stats"]
        for r in self.records:
            changed = "skipped" if r.skipped else ("yes" if r.modified else "no")
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            lines.append(f"{r.index:>3}  {r.text:<28}{changed:<9}{r.seconds * 1e3:>9.1f}  {stats}")
        return "\n".join(lines)


