"""Rewrite rules: matching through the op schema, check reasons, the tracer, overlaps."""

import pytest
import torch
from torch import nn

import qcompile
from qcompile import Match, Rule, RuleSet, apply_rule_set

aten = torch.ops.aten


class ReluToSigmoidAfterLinear(Rule):
    name = "linear-relu-to-sigmoid"

    @staticmethod
    def pattern(x, w, b):
        return aten.relu.default(aten.linear.default(x, w, b))

    def check(self, match: Match):
        if match["b"] is None:
            return "linear has no bias"
        return None

    def rewrite(self, match: Match):
        match.anchor.target = aten.sigmoid.default


class Model(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=bias)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + torch.relu(x)


class Escaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y) + y  # the linear's value is also used outside the pattern


def capture(model):
    return qcompile.capture(model.eval(), (torch.randn(2, 4),))


def test_rule_fires_and_matches_defaulted_arguments():
    gm = qcompile.copy_graph_module(capture(Model()))
    counts = apply_rule_set(gm, [ReluToSigmoidAfterLinear()], "test")
    assert counts == {"linear-relu-to-sigmoid": 1}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.sigmoid.default in targets and aten.relu.default in targets  # only the linear's relu


def test_tracer_reports_check_reason_and_structural_mismatch():
    gm = qcompile.copy_graph_module(capture(Model(bias=False)))
    with qcompile.trace_rules() as tracer:
        counts = apply_rule_set(gm, [ReluToSigmoidAfterLinear()], "test")
    assert not counts
    assert tracer.explain("relu") == "test/linear-relu-to-sigmoid at relu: not applied: linear has no bias"
    assert "input 0 comes from input x, the pattern needs aten.linear.default" in tracer.explain("relu_1")
    assert tracer.explain("linear") == "no rule had a pattern that could start at 'linear'"


def test_match_whose_inner_value_escapes_is_rejected_with_reason():
    gm = qcompile.copy_graph_module(capture(Escaping()))
    with qcompile.trace_rules() as tracer:
        assert not apply_rule_set(gm, [ReluToSigmoidAfterLinear()], "test")
    assert "intermediate value 'linear' is also used by add outside the pattern" in tracer.explain("relu")


class DropClone(Rule):
    name = "drop-clone"

    @staticmethod
    def pattern(x):
        return aten.clone.default(x)

    def rewrite(self, match: Match):
        match.anchor.replace_all_uses_with(match["x"])
        match.graph.erase_node(match.anchor)


class Clones(nn.Module):
    def forward(self, x):
        return x.clone().clone().clone() * 2


def test_chained_matches_are_rewritten_to_a_fixpoint():
    gm = qcompile.copy_graph_module(qcompile.capture(Clones(), (torch.randn(2, 3),)))
    assert apply_rule_set(gm, [DropClone()], "test") == {"drop-clone": 3}
    qcompile.verify_graph(gm)
    assert "clone" not in qcompile.print_graph(gm)


def test_apply_rules_pass_runs_a_registered_rule_set():
    qcompile.register_rule_set(RuleSet("test-drop-clone", [DropClone()]))
    gm = qcompile.capture(Clones(), (torch.randn(2, 3),))
    result = qcompile.PassManager("apply-rules{rule_set=test-drop-clone}", verify=True)(gm)
    assert result.records[0].stats == {"drop-clone": 3}


def test_apply_rules_with_unknown_rule_set_names_it():
    gm = qcompile.capture(Clones(), (torch.randn(2, 3),))
    with pytest.raises(qcompile.PassError, match="unknown rule set 'nope'"):
        qcompile.PassManager("apply-rules{rule_set=nope}")(gm)


def test_pattern_must_return_one_value():
    class TwoOutputs(Rule):
        name = "two"

        @staticmethod
        def pattern(x):
            return aten.relu.default(x), aten.sigmoid.default(x)

    with pytest.raises(ValueError, match="exactly one value"):
        TwoOutputs().pattern_graph
