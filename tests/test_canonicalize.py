"""canonicalize: structure, numerics, reasons it leaves a node, and the pass contract."""

import torch
from qcompile.passes import Canonicalize
from torch import nn

import qcompile
from qcompile.testing import (
    assert_graph_diff,
    assert_outputs_close,
    assert_pass_contract,
    check_graph,
)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.drop(self.fc(x)).to(torch.float32).clone().detach()
        return y.to(torch.float64)  # a real conversion: must stay


class WritesIntoClone(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1)  # in place: the clone is what keeps x unchanged
        return y * x


def test_structure_dropout_noop_conversions_copies_asserts_and_guards_go():
    gm = qcompile.capture(Noisy().eval(), (torch.randn(3, 6),))
    out = Canonicalize()(gm).graph_module
    assert_graph_diff(
        gm,
        out,
        removed=[
            "%dropout = aten.dropout.default(%linear, 0.3, False)",
            "%to = aten.to.dtype(%dropout, torch.float32)",
            "%clone = aten.clone.default(%to)",
            "%detach = aten.detach.default(%clone)",
            "%to_1 = aten.to.dtype(%detach, torch.float64)",
            "aten._assert_tensor_metadata.default",
            "aten._assert_tensor_metadata.default",
            "%_guards_fn = module[_guards_fn](%x)",
        ],
        added=["%to_1 = aten.to.dtype(%linear, torch.float64) : f64[s0,6]"],
    )
    check_graph(out, "CHECK: aten.linear.default\nCHECK-NEXT: aten.to.dtype({{.*}}torch.float64)\nCHECK-NEXT: return")


def test_numerics_unchanged_bit_for_bit():
    model = Noisy().eval()
    x = torch.randn(5, 6)
    gm = qcompile.capture(model, (x,))
    out = Canonicalize()(gm).graph_module
    assert assert_outputs_close(gm, out, (x,), rtol=0.0) == 0.0


def test_clone_written_in_place_stays_and_tracer_says_why():
    gm = qcompile.capture(WritesIntoClone(), (torch.randn(2, 3),))
    with qcompile.trace_rules() as tracer:
        out = Canonicalize()(gm).graph_module
    check_graph(out, "CHECK: aten.clone.default\nCHECK: aten.add_.Tensor")
    assert "'clone' is written in place by 'add_'" in tracer.explain("clone")
    x = torch.randn(2, 3)
    assert_outputs_close(gm, out, (x,), rtol=0.0)


def test_training_mode_dropout_stays_with_reason():
    gm = qcompile.capture(Noisy().train(), (torch.randn(3, 6),))
    with qcompile.trace_rules() as tracer:
        out = Canonicalize()(gm).graph_module
    check_graph(out, "CHECK: aten.dropout.default({{.*}}True)")
    assert "dropout runs in training mode" in tracer.explain("dropout")


def test_contract_on_minilm(minilm, minilm_example):
    model, _ = minilm
    gm = qcompile.capture(model, kwargs=minilm_example)
    out = assert_pass_contract(Canonicalize(), gm)
    text = qcompile.print_graph(out)
    for gone in ("dropout", "_assert_tensor_metadata", "_guards_fn"):
        assert gone not in text
    with torch.no_grad():
        torch.testing.assert_close(out(**minilm_example), gm(**minilm_example), rtol=0, atol=0)


def test_contract_with_numeric_check():
    x = torch.randn(3, 6)
    assert_pass_contract(Canonicalize(), qcompile.capture(Noisy().eval(), (x,)), example_args=(x,))
