"""compile(accuracy_budget=...): the knapsack against brute force, the greedy repair, the verified
budget on a real compile, the plan it writes, and the errors."""

import itertools
import json
import random

import pytest
import torch

import qcompile
from qcompile.errors import QCompileError
from qcompile.mixed_precision import Assignment, predicted_loss, repair, solve
from qcompile.sensitivity import Measurement, SearchedNode, Sensitivity, output_cosine
from tests.models import OutlierBlock


def _table(losses: list[list[float]], costs: list[list[float]], baseline: float = 0.0) -> Sensitivity:
    names = [f"c{j}" for j in range(len(losses[0]))]
    table = Sensitivity("cpu-int8", "output cosine", 1.0, baseline, names,
                        [SearchedNode(f"n{i}", "linear", "", "") for i in range(len(losses))])
    for i, (row, cost_row) in enumerate(zip(losses, costs, strict=True)):
        for j, (loss, cost) in enumerate(zip(row, cost_row, strict=True)):
            table.measurements.append(Measurement(f"n{i}", names[j], loss, 30.0, cost, 100))
    return table


def _brute_force(table: Sensitivity, budget: float) -> float:
    best = float("inf")
    nodes = [n.name for n in table.nodes]
    for combo in itertools.product(table.candidates, repeat=len(nodes)):
        choices = dict(zip(nodes, combo, strict=True))
        if predicted_loss(table, choices) <= budget:
            best = min(best, sum(table.of(n)[c].latency_ms for n, c in choices.items()))
    return best


def test_the_knapsack_finds_the_cheapest_assignment_within_the_budget():
    rng = random.Random(0)
    for _ in range(40):
        nodes = rng.randint(1, 5)
        # candidate 0 is exact and slow; the others trade loss for speed
        losses = [[0.0] + [rng.choice([rng.uniform(0, 4e-3), 0.0, -1e-5]) for _ in range(3)] for _ in range(nodes)]
        costs = [[1.0] + [rng.uniform(0.1, 1.2) for _ in range(3)] for _ in range(nodes)]
        table = _table(losses, costs, baseline=rng.choice([0.0, 2e-4]))
        budget = rng.choice([1e-3, 2e-3, 5e-3])
        found = solve(table, budget)
        assert found.predicted_loss <= budget + 1e-12
        assert found.cost == pytest.approx(sum(table.of(n)[c].latency_ms for n, c in found.choices.items()))
        # exact up to the loss rounding: never dearer than the best assignment with a budget
        # one rounding unit per node tighter
        assert found.cost <= _brute_force(table, budget - nodes * budget / 1000) + 1e-9


def test_an_impossible_budget_gives_the_most_accurate_formats():
    table = _table([[0.0, 1e-3], [0.0, 1e-3]], [[1.0, 0.5], [1.0, 0.5]], baseline=5e-3)
    assert solve(table, 1e-3).choices == {"n0": "c0", "n1": "c0"}


def test_the_size_objective_counts_bytes():
    table = _table([[0.0, 1e-3], [0.0, 1e-3]], [[1.0, 2.0], [1.0, 2.0]])
    table.measurements = [Measurement(m.node, m.candidate, m.loss, m.sqnr_db, m.latency_ms,
                                      100 if m.candidate == "c0" else 25) for m in table.measurements]
    assert solve(table, 1.5e-3, "latency").choices == {"n0": "c0", "n1": "c0"}
    assert sorted(solve(table, 1.5e-3, "size").choices.values()) == ["c0", "c1"]
    with pytest.raises(QCompileError, match="objective"):
        solve(table, 1e-3, "speed")


def test_repair_takes_the_most_loss_per_millisecond_first_until_the_excess_is_covered():
    # n0: 4e-3 -> 0 for +1 ms; n1: 2e-3 -> 0 for +0.1 ms (the better ratio); n2 has nothing better
    table = _table([[0.0, 4e-3], [0.0, 2e-3], [0.0, 0.0]], [[2.0, 1.0], [0.2, 0.1], [1.0, 0.5]])
    start = Assignment({"n0": "c1", "n1": "c1", "n2": "c1"}, 6e-3, 1.6)
    assert repair(table, start, 1e-3).choices == {"n0": "c1", "n1": "c0", "n2": "c1"}
    assert repair(table, start, 3e-3).choices == {"n0": "c0", "n1": "c0", "n2": "c1"}
    assert repair(table, Assignment({"n0": "c0", "n1": "c0", "n2": "c1"}, 0.0, 3.2), 1e-3) is None


@pytest.fixture(scope="module")
def block_data():
    generator = torch.Generator().manual_seed(11)
    calibration = [(torch.randn(8, 16, 64, generator=generator),) for _ in range(4)]
    held_out = [(torch.randn(8, 16, 64, generator=generator),) for _ in range(2)]
    return OutlierBlock(width=64, hidden=256), calibration, held_out


def test_a_budget_is_met_by_the_compiled_model_and_its_plan_replays(block_data, tmp_path):
    model, calibration, held_out = block_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = 2e-4
    qm = qcompile.compile(model, calibration_data=calibration, eval_data=held_out, accuracy_budget=budget,
                          objective="size")
    rounds = qm.report.budget["rounds"]
    final = rounds[-1]
    assert final["predicted_loss"] <= budget and final["measured_loss"] <= budget
    # the smallest formats that fit: not all float, not all int4 (int4 alone is over the budget here)
    assert set(final["choices"].values()) - {"float"}
    with torch.no_grad():
        drop = sum(1 - output_cosine(model(*b), qm(*b)) for b in held_out) / len(held_out)
    assert drop == pytest.approx(final["measured_loss"], rel=1e-6, abs=1e-12)
    assert any("accuracy budget 0.0002" in note and "measured" in note for note in qm.report.notes)
    rules = {e["node"]: e["rule"] for e in qm.report.plan}
    assert all(rules[n].startswith(f"accuracy budget: {c} ") for n, c in final["choices"].items())
    # the plan replays to the same Q/DQ program
    replayed = qcompile.compile(model, calibration_data=calibration, plan=qm.report.write_plan(tmp_path / "p.json"))
    x = held_out[0][0]
    torch.testing.assert_close(replayed.qdq_graph_module(x), qm.qdq_graph_module(x), rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    table = qcompile.Sensitivity.from_json(qm.report.budget["sensitivity"])
    assert {n.name for n in table.nodes} == set(final["choices"])
    page = qm.report.write_html(tmp_path / "report.html").read_text()
    assert 'id="section-precision-search"' in page and page.count('class="chosen"') == len(final["choices"])
    # the report, budget and all, survives the saved format
    assert qcompile.load(qm.save(tmp_path / "m.qc")).report.budget == qm.report.budget


def test_a_budget_that_cannot_hold_is_said(block_data):
    model, calibration, held_out = block_data
    # Without float among the candidates (float linears are exact fp32 on a CPU without bf16 GEMMs).
    quantized = {kind: tuple(c for c in options if c.config is not None)
                 for kind, options in qcompile.get_target("cpu-int8").candidates.items()}
    with pytest.warns(UserWarning, match="the budget does not hold"):
        qm = qcompile.compile(model, calibration_data=calibration, eval_data=held_out, accuracy_budget=1e-12,
                              candidates=quantized)
    assert any(note.endswith("the budget does not hold") for note in qm.report.notes)
    assert qm.report.budget["rounds"][-1]["measured_loss"] > 1e-12


def test_a_node_the_plan_opts_out_of_smoothing_replays_unsmoothed(block_data, tmp_path):
    model, calibration, _ = block_data
    qconfig = qcompile.int8_preset().set_node("linear_1", qcompile.OpQuantConfig(
        qcompile.qconfig.INT8_ACTIVATION, qcompile.qconfig.INT8_WEIGHT, smooth=False))
    smoothed = qcompile.compile(model, calibration_data=calibration)
    opted_out = qcompile.compile(model, calibration_data=calibration, qconfig=qconfig)
    stats = lambda qm: next(p.stats for p in qm.report.passes if p.name.startswith("smooth-outliers"))  # noqa: E731
    assert "split" in stats(smoothed) and "split" not in stats(opted_out)
    plan = json.loads(opted_out.report.write_plan(tmp_path / "p.json").read_text())
    assert next(e for e in plan["nodes"] if e["node"] == "linear_1")["smooth"] is False
    replayed = qcompile.compile(model, calibration_data=calibration, plan=plan)
    assert "split" not in stats(replayed)


def test_budget_arguments_are_checked(block_data):
    model, calibration, _ = block_data
    with pytest.raises(QCompileError, match="no qconfig or plan"):
        qcompile.compile(model, calibration_data=calibration, accuracy_budget=1e-3, qconfig=qcompile.int8_preset())
    with pytest.raises(QCompileError, match="needs calibration_data"):
        qcompile.compile(model, calibration[0], accuracy_budget=1e-3)
    with pytest.raises(QCompileError, match="> 0"):
        qcompile.compile(model, calibration_data=calibration, accuracy_budget=0.0)
    with pytest.raises(QCompileError, match="objective"):
        qcompile.compile(model, calibration_data=calibration, accuracy_budget=1e-3, objective="speed")
