"""Declarative rewrite rules over ATen graphs.

A :class:`Rule` is a pattern (a plain function over ``torch.ops.aten`` ops, traced once into a
pattern graph), a ``check`` that returns ``None`` when the rule applies or a *reason* when it
does not, and a ``rewrite``. Rules group into :class:`RuleSet` s; :func:`apply_rule_set` (and
the generic ``apply-rules`` pass) applies one.

Matching is torch.fx's ``SubgraphMatcher``: it backtracks from the pattern's output, matches
literals through the op schema (so defaulted arguments still match), and rejects matches whose
inner values are used outside. Overlaps are resolved here, first match in graph order wins,
because a rewrite invalidates the matches that shared its nodes.

A :class:`RuleTracer` (``with trace_rules() as tracer``) records, for every node a rule's
pattern could start from, whether the rule fired and, if not, why: the basis of "why is this
node still float?".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from qcompile.ir.printer import describe_producer
from qcompile.pipeline import PassResult

# A rewrite may need several sweeps (a no-op feeding a no-op); each sweep applies at least one
# match or stops, so this bound is only a guard against a rule whose rewrite re-creates its match.
_MAX_SWEEPS = 64


@dataclass
class Match:
    """One place a rule's pattern matched, as the rule's ``check`` and ``rewrite`` see it."""

    graph_module: fx.GraphModule
    anchor: fx.Node
    bindings: dict[str, Any]
    nodes: list[fx.Node]
    pass_name: str

    def __getitem__(self, name: str) -> Any:
        """What the pattern argument ``name`` bound to: a graph node or a literal."""
        return self.bindings[name]

    def op(self, target: Any) -> fx.Node:
        """The matched graph node for a pattern op (the first, if the pattern uses it twice)."""
        for node in self.nodes:
            if node.target == target:
                return node
        raise KeyError(f"pattern has no op {target}")

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


class Rule:
    """Subclass and set ``name``, ``pattern`` (a function of ATen ops), ``check`` and ``rewrite``.

    ``ignore_literals`` (default True) lets literal arguments such as strides match anything,
    so ``check`` decides about them with a reason instead of the matcher silently refusing.
    """

    name: ClassVar[str] = ""
    ignore_literals: ClassVar[bool] = True
    pattern: Callable[..., Any]

    def check(self, match: Match) -> str | None:
        return None

    def rewrite(self, match: Match) -> None:
        raise NotImplementedError(f"rule '{self.name}' does not implement rewrite()")

    @functools.cached_property
    def pattern_graph(self) -> fx.Graph:
        graph = fx.symbolic_trace(self.pattern).graph
        returned = next(n for n in graph.nodes if n.op == "output").all_input_nodes
        if len(returned) != 1:
            raise ValueError(f"rule '{self.name}': a pattern must return exactly one value")
        return graph

    @functools.cached_property
    def pattern_anchor(self) -> fx.Node:
        return next(n for n in self.pattern_graph.nodes if n.op == "output").all_input_nodes[0]

    def describe_pattern(self) -> str:
        return " -> ".join(
            str(n.target) for n in self.pattern_graph.nodes if n.op == "call_function"
        )


@dataclass
class RuleSet:
    name: str
    rules: list[Rule]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(f"{self.name}+{other.name}", [*self.rules, *other.rules])


_RULE_SETS: dict[str, RuleSet] = {}


def register_rule_set(rule_set: RuleSet) -> RuleSet:
    _RULE_SETS[rule_set.name] = rule_set
    return rule_set


def get_rule_set(name: str) -> RuleSet:
    import qcompile.passes  # noqa: F401  (importing registers the built-in rule sets)

    if name not in _RULE_SETS:
        raise KeyError(f"unknown rule set '{name}' (known: {', '.join(sorted(_RULE_SETS)) or 'none'})")
    return _RULE_SETS[name]


@dataclass(frozen=True)
class RuleOutcome:
    pass_name: str
    rule: str
    node: str
    applied: bool
    reason: str | None = None

    def __str__(self) -> str:
        verdict = "applied" if self.applied else f"not applied: {self.reason}"
        return f"{self.pass_name}/{self.rule} at {self.node}: {verdict}"


@dataclass
class RuleTracer:
    """Outcome of every rule at every node its pattern could start from, latest per pair."""

    outcomes: dict[tuple[str, str, str], RuleOutcome] = field(default_factory=dict)

    def record(self, outcome: RuleOutcome) -> None:
        self.outcomes[(outcome.pass_name, outcome.rule, outcome.node)] = outcome

    def why(self, node_name: str) -> list[RuleOutcome]:
        return [o for o in self.outcomes.values() if o.node == node_name]

    def explain(self, node_name: str) -> str:
        found = self.why(node_name)
        if not found:
            return f"no rule had a pattern that could start at '{node_name}'"
        return "\n".join(str(o) for o in found)


_ACTIVE_TRACERS: contextvars.ContextVar[tuple[RuleTracer, ...]] = contextvars.ContextVar(
    "qcompile_rule_tracers", default=()
)


@contextlib.contextmanager
def trace_rules() -> Iterator[RuleTracer]:
    tracer = RuleTracer()
    token = _ACTIVE_TRACERS.set((*_ACTIVE_TRACERS.get(), tracer))
    try:
        yield tracer
    finally:
        _ACTIVE_TRACERS.reset(token)


def _record(pass_name: str, rule: Rule, node: fx.Node, applied: bool, reason: str | None = None) -> None:
    for tracer in _ACTIVE_TRACERS.get():
        tracer.record(RuleOutcome(pass_name, rule.name, node.name, applied, reason))


def _to_match(gm: fx.GraphModule, rule: Rule, internal: InternalMatch, pass_name: str) -> Match:
    bindings = {pn.target: gn for pn, gn in internal.nodes_map.items() if pn.op == "placeholder"}
    nodes = [
        gn for pn, gn in internal.nodes_map.items() if pn.op not in ("placeholder", "output")
    ]
    anchor = internal.nodes_map[rule.pattern_anchor]
    return Match(gm, anchor, bindings, nodes, pass_name)


def _first_structural_mismatch(pattern: fx.Node, node: fx.Node) -> str:
    """The first pattern input whose producing op differs, for a readable no-match reason."""
    for i, (p_arg, g_arg) in enumerate(zip(pattern.args, node.args)):
        if isinstance(p_arg, fx.Node) and p_arg.op == "call_function":
            if not isinstance(g_arg, fx.Node) or g_arg.op != "call_function" or g_arg.target != p_arg.target:
                found = describe_producer(g_arg) if isinstance(g_arg, fx.Node) else f"the literal {g_arg!r}"
                return f"input {i} comes from {found}, the pattern needs {p_arg.target}"
            deeper = _first_structural_mismatch(p_arg, g_arg)
            if deeper:
                return deeper
    return ""


def _match_at(matcher: SubgraphMatcher, rule: Rule, node: fx.Node) -> InternalMatch | str:
    """The match of ``rule`` rooted at ``node``, or the reason there is none.

    This is ``SubgraphMatcher.match`` for one anchor: its node matcher and containment check.
    Its cycle check (a BFS over the rest of the graph per match, quadratic over a model) is
    not needed: every pattern node is an ancestor of the single output, and containment keeps
    the others' values inside, so no path can leave the match and re-enter it.
    """
    attempt = InternalMatch(anchors=[rule.pattern_anchor])
    if not matcher._match_nodes(rule.pattern_anchor, node, attempt):
        detail = _first_structural_mismatch(rule.pattern_anchor, node)
        return f"does not match pattern {rule.describe_pattern()}" + (f" ({detail})" if detail else "")
    if not matcher._is_contained(attempt.nodes_map):
        inner = {gn for pn, gn in attempt.nodes_map.items() if pn.op != "placeholder"}
        for gn in inner - {node}:
            outside = [u.name for u in gn.users if u not in inner]
            if outside:
                return f"intermediate value '{gn.name}' is also used by {', '.join(outside)} outside the pattern"
        return "an intermediate value is used outside the pattern"
    return attempt


def _is_stale(match: Match, consumed: set[fx.Node]) -> bool:
    inputs = [v for v in match.bindings.values() if isinstance(v, fx.Node)]
    return any(n in consumed or n._erased for n in [*match.nodes, *inputs])


def apply_rule_set(gm: fx.GraphModule, rules: Iterable[Rule], pass_name: str) -> Counter[str]:
    """Apply each rule to a fixpoint, in order; returns how often each rule fired."""
    counts: Counter[str] = Counter()
    for rule in rules:
        matcher = SubgraphMatcher(
            rule.pattern_graph,
            match_output=False,
            match_placeholder=False,
            remove_overlapping_matches=False,
            ignore_literals=rule.ignore_literals,
        )
        for _ in range(_MAX_SWEEPS):
            applied = _sweep(gm, rule, matcher, pass_name)
            counts[rule.name] += applied
            if not applied:
                break
    return +counts


def _sweep(gm: fx.GraphModule, rule: Rule, matcher: SubgraphMatcher, pass_name: str) -> int:
    matches = []
    for node in gm.graph.nodes:
        if matcher._nodes_are_equal(rule.pattern_anchor, node):
            found = _match_at(matcher, rule, node)
            if isinstance(found, str):
                _record(pass_name, rule, node, False, found)
            else:
                matches.append(_to_match(gm, rule, found, pass_name))
    consumed: set[fx.Node] = set()
    applied = 0
    for match in matches:
        if _is_stale(match, consumed):
            continue  # an earlier rewrite in this sweep touched it; the next sweep re-matches
        reason = rule.check(match)
        if reason is not None:
            _record(pass_name, rule, match.anchor, False, reason)
            continue
        consumed.update(match.nodes)
        rule.rewrite(match)
        applied += 1
        _record(pass_name, rule, match.anchor, True)
    return applied


M = TypeVar("M")


def fuse_matches(gm: fx.GraphModule, match: Callable[[fx.Node], M | None], fuse: Callable[[M], None],
                 stat: str = "fused") -> PassResult:
    """Every node in graph order offered to ``match``; each match found is ``fuse``d. The loop of
    the fusions whose pattern is easier said in code than as an ATen pattern (a multiply that
    may be absent, a quantize's constant parameters); stats count the fused matches as ``stat``."""
    fused = 0
    for node in list(gm.graph.nodes):
        found = match(node)
        if found is not None:
            fuse(found)
            fused += 1
    return PassResult(gm, bool(fused), {stat: fused} if fused else {})
