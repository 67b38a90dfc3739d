"""Graph invariants checked between passes in verify mode.

Each invariant is a function ``(gm) -> list[str]`` returning problems; the verifier is a table
of them so that later stages (Q/DQ, observers) add their own rules next to the general ones.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from qcompile.errors import VerificationError
from qcompile.ir.graph import describe_node, fetch_attr

Invariant = Callable[[fx.GraphModule], list[str]]


def fx_lint(gm: fx.GraphModule) -> list[str]:
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError and AssertionError alike
        return [f"fx lint: {exc}"]
    return []


def get_attr_targets_exist(gm: fx.GraphModule) -> list[str]:
    problems = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                fetch_attr(gm, node.target)
            except AttributeError as exc:
                problems.append(f"{describe_node(node)}: {exc}")
    return problems


def values_have_fake_meta(gm: fx.GraphModule) -> list[str]:
    """Every computed value carries ``meta['val']``: later passes read shapes and dtypes there."""
    return [
        f"{describe_node(node)} has no meta['val'] (create nodes through qcompile.ir helpers "
        "or call infer_fake_value)"
        for node in gm.graph.nodes
        if node.op in ("placeholder", "get_attr", "call_function") and "val" not in node.meta
    ]


INVARIANTS: list[Invariant] = [fx_lint, get_attr_targets_exist, values_have_fake_meta]


def register_invariant(invariant: Invariant) -> Invariant:
    """Add an invariant to every later verification (usable as a decorator)."""
    if invariant not in INVARIANTS:
        INVARIANTS.append(invariant)
    return invariant


def find_problems(gm: fx.GraphModule) -> list[str]:
    problems: list[str] = []
    for invariant in INVARIANTS:
        problems.extend(invariant(gm))
    return problems


def verify_graph(gm: fx.GraphModule) -> None:
    problems = find_problems(gm)
    if problems:
        raise VerificationError("graph verification failed:\n  " + "\n  ".join(problems))
