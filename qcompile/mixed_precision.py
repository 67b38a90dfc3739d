"""``compile(..., accuracy_budget=...)``: the fastest (or smallest) per-node formats whose loss fits a budget.

1. **Measure** (:mod:`qcompile.sensitivity`): for each searched node ``n`` and candidate format
   ``c``, its isolated loss ``ℓ(n, c)`` over the baseline loss ``L0``, its latency ``t(n, c)``
   and its weight bytes ``b(n, c)``.
2. **Solve** the multiple-choice knapsack: one format per node, minimizing ``Σ t(n, c_n)`` (or
   ``Σ b(n, c_n)``) subject to ``L0 + Σ ℓ(n, c_n) ≤ budget``. Losses are counted in units of
   ``budget / RESOLUTION``, rounded up (a negative loss, noise that happened to help, counts as
   0), so the dynamic program over (node, used capacity) is exact on the rounded problem and
   never under-counts: ``O(nodes × candidates × RESOLUTION)``, a fraction of a second.
3. **Verify**: compile that plan and measure the compiled model's loss on the evaluation data
   (kernels, bf16 float ops and all). While it is over the budget, **repair** greedily: move
   the nodes whose next more accurate format removes the most predicted loss per millisecond
   (or byte) added, until the predicted removal covers the excess, and compile again.

The plan that comes out is an ordinary plan (``report.write_plan``): each searched node's rule
says which format the search chose and why, and it replays with ``compile(plan=...)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qcompile.calibration import as_call
from qcompile.capture import eval_mode
from qcompile.errors import QCompileError
from qcompile.qconfig import Candidate, QConfig
from qcompile.sensitivity import Measurement, Metric, Sensitivity, output_cosine, sensitivity
from qcompile.targets import Target, get_target

if TYPE_CHECKING:
    from qcompile.api import QuantizedModel
    from qcompile.report import CompileReport

RESOLUTION = 1000
OBJECTIVES = ("latency", "size")
# Compiles of a repaired plan before compile gives up on the budget and says so.
MAX_REPAIRS = 4


@dataclass(frozen=True)
class Assignment:
    """A format per searched node, with the loss the measurements predict and the total cost."""

    choices: dict[str, str]
    predicted_loss: float
    cost: float


def _cost(m: Measurement, objective: str) -> float:
    return m.latency_ms if objective == "latency" else float(m.weight_bytes)


def _offered(table: Sensitivity, node: str) -> list[Measurement]:
    """The formats the search may give ``node``: those the target ran it in."""
    return [m for m in table.of(node).values() if m.float_reason is None]


def _total_cost(table: Sensitivity, choices: dict[str, str], objective: str) -> float:
    return sum(_cost(table.of(n)[c], objective) for n, c in choices.items())


def predicted_loss(table: Sensitivity, choices: dict[str, str]) -> float:
    """``L0 + Σ ℓ(n, c_n)``, negative isolated losses counted as 0."""
    return table.baseline_loss + sum(max(0.0, table.of(n)[c].loss) for n, c in choices.items())


def solve(table: Sensitivity, budget: float, objective: str = "latency") -> Assignment:
    """The cheapest assignment whose predicted loss fits ``budget`` (the module docstring's
    step 2). When even the most accurate formats do not fit, those."""
    if objective not in OBJECTIVES:
        raise QCompileError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    nodes = [n.name for n in table.nodes if _offered(table, n.name)]
    unit = budget / RESOLUTION
    capacity = math.floor((budget - table.baseline_loss) / unit + 1e-9) if budget > 0 else -1
    if capacity < 0:
        return _most_accurate(table, nodes, objective)
    # cheapest[w]: the least cost of the nodes so far with rounded loss at most w.
    cheapest = [0.0] * (capacity + 1)
    picks: list[list[int]] = []
    for node in nodes:
        options = _offered(table, node)
        weights = [math.ceil(max(0.0, m.loss) / unit - 1e-9) for m in options]
        costs = [_cost(m, objective) for m in options]
        new, pick = [math.inf] * (capacity + 1), [-1] * (capacity + 1)
        for w in range(capacity + 1):
            for i, (weight, cost) in enumerate(zip(weights, costs, strict=True)):
                if weight <= w and cheapest[w - weight] + cost < new[w]:
                    new[w], pick[w] = cheapest[w - weight] + cost, i
        cheapest = new
        picks.append(pick)
    if math.isinf(cheapest[capacity]):
        return _most_accurate(table, nodes, objective)
    choices, w = {}, capacity
    for node, pick in zip(reversed(nodes), reversed(picks), strict=True):
        options = _offered(table, node)
        chosen = options[pick[w]]
        choices[node] = chosen.candidate
        w -= math.ceil(max(0.0, chosen.loss) / unit - 1e-9)
    choices = {n: choices[n] for n in nodes}
    return Assignment(choices, predicted_loss(table, choices), cheapest[capacity])


def _most_accurate(table: Sensitivity, nodes: list[str], objective: str) -> Assignment:
    choices = {n: min(_offered(table, n), key=lambda m: (m.loss, _cost(m, objective))).candidate for n in nodes}
    return Assignment(choices, predicted_loss(table, choices), _total_cost(table, choices, objective))


def repair(table: Sensitivity, assignment: Assignment, excess: float, objective: str = "latency") -> Assignment | None:
    """``assignment`` with nodes moved to more accurate formats until the predicted loss they
    remove covers ``excess``: each node's move with the most loss removed per unit of cost
    added, the best moves first. None when no node can move."""
    moves = []
    for node, current in assignment.choices.items():
        now = table.of(node)[current]
        better = [m for m in _offered(table, node) if m.loss < now.loss]
        if better:
            best = max(better, key=lambda m: (now.loss - m.loss) / max(_cost(m, objective) - _cost(now, objective), 1e-9))
            gain, added = now.loss - best.loss, _cost(best, objective) - _cost(now, objective)
            moves.append((gain / max(added, 1e-9), gain, node, best.candidate))
    if not moves:
        return None
    choices, removed = dict(assignment.choices), 0.0
    for _, gain, node, candidate in sorted(moves, reverse=True):
        choices[node] = candidate
        removed += gain
        if removed >= excess:
            break
    return Assignment(choices, predicted_loss(table, choices), _total_cost(table, choices, objective))


def budget_qconfig(table: Sensitivity, assignment: Assignment, target: Target,
                   candidates: dict[str, tuple[Candidate, ...]], objective: str) -> QConfig:
    """The target's preset with each searched node set to its chosen format, and why."""
    kinds = {n.name: n.kind for n in table.nodes}
    qconfig = target.preset()
    for node, name in assignment.choices.items():
        chosen = table.of(node)[name]
        fastest = min(_offered(table, node), key=lambda m: _cost(m, objective))
        unit = "ms" if objective == "latency" else "bytes"
        why = (f"accuracy budget: {name} (loss {chosen.loss:.1e}, {_cost(chosen, objective):.4g} {unit})"
               + ("" if fastest.candidate == name else
                  f"; {fastest.candidate} ({_cost(fastest, objective):.4g} {unit}) would add {fastest.loss:.1e}"))
        config = next(c.config for c in candidates[kinds[node]] if c.name == name)
        qconfig = qconfig.set_node(node, config, why)
    return qconfig


def module_qconfig(report: CompileReport, target: Target,
                   candidates: dict[str, tuple[Candidate, ...]] | None = None) -> QConfig:
    """The formats a budget search chose for a compiled model, as module-name rules over the
    target's preset: the same choices for another program that calls the same modules (a
    decoder's prefill replays its step's). A module two searched nodes share gets the more
    accurate of their formats."""
    if not report.budget:
        raise QCompileError("module_qconfig reads the formats of a compile with an accuracy_budget; this one had none")
    table = Sensitivity.from_json(report.budget["sensitivity"])
    choices = report.budget["rounds"][-1]["choices"]
    offered = candidates if candidates is not None else target.candidates
    by_module: dict[str, Measurement] = {}
    for node in table.nodes:
        if not node.module:
            raise QCompileError(f"node '{node.name}' comes from no module: its format cannot be replayed by module name")
        chosen = table.of(node.name)[choices[node.name]]
        kept = by_module.get(node.module)
        if kept is None or chosen.loss < kept.loss:
            by_module[node.module] = chosen
    kinds = {n.name: n.kind for n in table.nodes}
    qconfig = target.preset()
    for module, chosen in by_module.items():
        config = next(c.config for c in offered[kinds[chosen.node]] if c.name == chosen.candidate)
        qconfig = qconfig.set_module_name(module, config)
    return qconfig


def measured_loss(model: nn.Module, compiled: nn.Module, batches: list[tuple[tuple, dict]], metric: Metric) -> float:
    """The drop of ``metric`` from the float model to the compiled one, averaged over ``batches``."""
    drops = []
    with eval_mode(model), torch.no_grad():
        for args, kwargs in batches:
            reference = model(*args, **kwargs)
            drops.append(metric(reference, reference) - metric(reference, compiled(*args, **kwargs)))
    return sum(drops) / len(drops)


def compile_within_budget(
    model: nn.Module,
    example_inputs: Any,
    *,
    accuracy_budget: float,
    calibration_data: Iterable[Any],
    eval_data: Iterable[Any] | None,
    metric: Metric | None,
    objective: str,
    target: str | Target,
    candidates: dict[str, tuple[Candidate, ...]] | None,
    **options: Any,
) -> QuantizedModel:
    """``compile`` with the formats the search chose (the module docstring's three steps)."""
    from qcompile.api import compile

    if accuracy_budget <= 0:
        raise QCompileError(f"accuracy_budget is a largest allowed drop of the metric, > 0; got {accuracy_budget}")
    if objective not in OBJECTIVES:
        raise QCompileError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    target = target if isinstance(target, Target) else get_target(target)
    batches = list(calibration_data)
    held_out = list(eval_data) if eval_data is not None else batches
    evaluation = [as_call(b) for b in held_out]
    score = metric or output_cosine
    choices = candidates if candidates is not None else target.candidates
    table = sensitivity(model, batches, target=target, eval_data=held_out, metric=metric,
                        candidates=choices, example_inputs=example_inputs,
                        example_kwargs=options.pop("example_kwargs", None),
                        outlier_smoothing=options.get("outlier_smoothing", 0.75))
    assignment = solve(table, accuracy_budget, objective)
    rounds = []
    while True:
        compiled = compile(model, example_inputs, target=target, calibration_data=batches,
                           qconfig=budget_qconfig(table, assignment, target, choices, objective), **options)
        loss = measured_loss(model, compiled, evaluation, score)
        rounds.append({"choices": dict(assignment.choices), "predicted_loss": assignment.predicted_loss,
                       "measured_loss": loss, "cost": assignment.cost})
        if loss <= accuracy_budget or len(rounds) > MAX_REPAIRS:
            break
        repaired = repair(table, assignment, loss - accuracy_budget, objective)
        if repaired is None:
            break
        assignment = repaired
    report = compiled.report
    report.budget = {"accuracy_budget": accuracy_budget, "metric": table.metric, "objective": objective,
                     "evaluation_batches": len(evaluation), "rounds": rounds, "sensitivity": table.to_json()}
    counts: dict[str, int] = {}
    for name in assignment.choices.values():
        counts[name] = counts.get(name, 0) + 1
    formats = ", ".join(f"{name} x{count}" for name, count in counts.items())
    held = loss <= accuracy_budget
    message = (f"accuracy budget {accuracy_budget:g} ({table.metric} drop, {objective}): predicted "
               f"{assignment.predicted_loss:.2e}, measured {loss:.2e} on {len(evaluation)} evaluation batches after "
               f"{len(rounds) - 1} repairs; formats {formats}")
    report.notes.append(message if held else message + ": the budget does not hold")
    if not held:
        warnings.warn(f"{message}: the budget does not hold (the formats measured most accurate were tried)",
                      stacklevel=3)
    return compiled
