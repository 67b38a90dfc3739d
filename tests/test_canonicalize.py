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
        y[:, 0].add_(1)  # in place through a view: the clone is what keeps x unchanged
        return y * x


class InPlaceBlock(nn.Module):
    """What ResNets export: ``nn.ReLU(inplace=True)`` is ``relu_`` and ``out += identity`` is ``add_``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.fc(x))
        before = out * 2  # reads the value before the write below
        out += x
        return self.relu(out) + before


class WritesItsInput(nn.Module):
    def forward(self, x):
        x.relu_()
        return x * 2


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


def test_clone_written_in_place_through_a_view_stays_and_tracer_says_why():
    gm = qcompile.capture(WritesIntoClone(), (torch.randn(2, 3),))
    with qcompile.trace_rules() as tracer:
        out = Canonicalize()(gm).graph_module
    check_graph(out, "CHECK: aten.clone.default\nCHECK: aten.add_.Tensor")
    assert "'clone' is written in place by 'add_'" in tracer.explain("clone")
    x = torch.randn(2, 3)
    assert_outputs_close(gm, out, (x,), rtol=0.0)


def test_in_place_ops_on_fresh_values_become_out_of_place_and_later_reads_see_the_result():
    x = torch.randn(4, 6)
    gm = qcompile.capture(InPlaceBlock().eval(), (x,))
    result = Canonicalize()(gm)
    assert result.stats["out-of-place"] == 3
    check_graph(result.graph_module, """
    CHECK: %3 = aten.linear.default
    CHECK-NEXT: %4 = aten.relu.default(%3)
    CHECK-NEXT: %5 = aten.add.Tensor(%4, %0)
    CHECK-NEXT: %6 = aten.relu.default(%5)
    CHECK-NEXT: %7 = aten.mul.Tensor(%4, 2)
    """)
    text = qcompile.print_graph(result.graph_module)
    assert "relu_" not in text and "add_" not in text
    assert assert_outputs_close(gm, result.graph_module, (x,), rtol=0.0) == 0.0


def test_a_write_into_an_input_stays_in_place():
    gm = qcompile.capture(WritesItsInput(), (torch.randn(2, 3),))
    out = Canonicalize()(gm).graph_module
    check_graph(out, "CHECK: aten.relu_.default(%0)")


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


def test_a_write_into_a_piece_of_a_split_stays_in_place():
    class WritesASplitPiece(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            first, _ = y.split(3, dim=1)
            first.relu_()  # a view of y: y must see the write
            return y + 1

    x = torch.randn(2, 6)
    gm = qcompile.capture(WritesASplitPiece(), (x,))
    out = Canonicalize()(gm).graph_module
    check_graph(out, "CHECK: aten.relu_.default")
    assert assert_outputs_close(gm, out, (x,), rtol=0.0) == 0.0


def test_string_conv_padding_becomes_numbers_so_the_conv_is_quantized_and_lowered():
    class Valid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Conv2d(3, 8, 3, padding="valid")
            self.b = torch.nn.Conv2d(8, 8, 3, padding="same", dilation=2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(2, 3, 12, 12)
    gm = qcompile.capture(Valid(), (x,))
    assert sum(n.target == torch.ops.aten.conv2d.padding for n in gm.graph.nodes) == 2
    out = assert_pass_contract(Canonicalize(), gm, [x])
    convs = [qcompile.op_arguments(n)["padding"] for n in out.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert convs == [[0, 0], [2, 2]]
    qm = qcompile.compile(Valid(), calibration_data=[(torch.randn(2, 3, 12, 12),) for _ in range(2)], progress=False)
    assert [n.detail.split(" ")[0] for n in qm.report.nodes] == ["qc.conv2d_int8+relu", "qc.conv2d_int8"]


def test_a_pad_of_nothing_goes_and_a_real_pad_stays():
    """TF-style "same" padding (HF MobileNet, EfficientNet) pads every layer, mostly by nothing: a
    copy and a float op between two int8 convolutions."""
    class TfPadded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, stride=2)
            self.c = torch.nn.Conv2d(8, 8, 3, padding=(0, 1), groups=8)

        def forward(self, x):
            y = torch.relu(self.a(torch.nn.functional.pad(x, [0, 0, 0, 0])))
            y = self.b(torch.nn.functional.pad(y, [0, 1, 0, 1]))
            return self.c(torch.nn.functional.pad(y, [2, 2, 1, 1]))  # a symmetric pad: the conv's own

    x = torch.randn(2, 3, 12, 12)
    gm = qcompile.capture(TfPadded(), (x,))
    out = assert_pass_contract(Canonicalize(), gm, [x])
    check_graph(out, """
    CHECK-NOT: [0, 0, 0, 0]
    CHECK: aten.pad.default({{.*}}, [0, 1, 0, 1])
    CHECK-NOT: aten.pad
    CHECK: aten.conv2d.default({{.*}}, [1, 1], [1, 3], [1, 1], 8)
    """)
    assert_outputs_close(gm, out, (x,), rtol=1e-6)  # the same zeros: a convolution's summation order apart


def test_a_cat_onto_an_empty_tensor_reads_the_other_operand():
    """A KV cache made empty and then extended (transformers' DynamicCache.update in a decode step)
    captures as cat(tensor([]), past): a copy of the whole cache per layer and step. ATen's cat
    skips 1-D empties, so dropping the operand is exact; one that promotes the dtype stays."""
    class Extends(torch.nn.Module):
        def forward(self, past, new, ids):
            keys = torch.cat([torch.tensor([]), past], dim=-2)
            widened = torch.cat([torch.tensor([]), ids], dim=0)  # float32 from int64: the empty one decides
            return torch.cat([keys, new], dim=-2), widened

    inputs = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 1, 4), torch.arange(3))
    gm = qcompile.capture(Extends(), inputs)
    out = assert_pass_contract(Canonicalize(), gm, inputs)
    check_graph(out, """
    CHECK: aten.cat.default([%0, %1], -2) : f32[1,s0,s1 + 1,s2]
    """)
    cats = [n for n in out.graph.nodes if n.target == torch.ops.aten.cat.default]
    assert len(cats) == 2 and out(*inputs)[1].dtype == torch.float32
    assert_outputs_close(gm, out, inputs, rtol=0)
