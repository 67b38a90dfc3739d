"""Canonical text IR: stable numbering, symbols and types; diffs by node name."""

import torch
from torch import fx, nn

import qcompile
from qcompile.testing import check_text


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


def test_identical_text_for_two_captures_of_the_same_model():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(3, 4)
    assert qcompile.print_graph(qcompile.capture(model, (x,))) == qcompile.print_graph(qcompile.capture(model, (x,)))


def test_numbering_types_and_symbols():
    gm = qcompile.capture(TwoBranch().eval(), (torch.randn(3, 4),))
    check_text(
        qcompile.print_graph(gm),
        """
        CHECK: %0 = input x : f32[s0,4]
        CHECK: %1 = constant a.weight : f32[4,4]
        CHECK: %3 = aten.linear.default(%0, %1, %2) : f32[s0,4]
        CHECK-NEXT: %4 = aten.relu.default(%3) : f32[s0,4]
        CHECK: aten.add.Tensor
        CHECK: return (
        """,
    )


def test_text_does_not_depend_on_node_insertion_order():
    gm = qcompile.capture(TwoBranch().eval(), (torch.randn(3, 4),))
    moved = qcompile.copy_graph_module(gm)
    # Move every constant to just before its first user: a different but equivalent node list.
    for node in list(moved.graph.nodes):
        if node.op == "get_attr" and node.users:
            first_user = min(node.users, key=lambda u: list(moved.graph.nodes).index(u))
            first_user.prepend(node)
    assert [n.name for n in moved.graph.nodes] != [n.name for n in gm.graph.nodes]
    assert qcompile.print_graph(moved) == qcompile.print_graph(gm)


def test_diff_shows_only_changed_lines_by_node_name():
    gm = qcompile.capture(TwoBranch().eval(), (torch.randn(3, 4),))
    changed = qcompile.copy_graph_module(gm)
    relu = next(n for n in changed.graph.nodes if n.target == torch.ops.aten.relu.default)
    with changed.graph.inserting_after(relu):
        sigmoid = changed.graph.call_function(torch.ops.aten.sigmoid.default, (relu.args[0],))
    qcompile.infer_fake_value(sigmoid)
    relu.replace_all_uses_with(sigmoid)
    changed.graph.erase_node(relu)
    diff = qcompile.diff_graphs(gm, changed)
    assert "-%relu = aten.relu.default(%linear) : f32[s0,4]" in diff
    assert "+%sigmoid_default = aten.sigmoid.default(%linear) : f32[s0,4]" in diff
    assert "+%add = aten.add.Tensor(%sigmoid_default, %linear_1)" in diff
    added, removed = qcompile.ir.printer.changed_lines(gm, changed)
    assert len(added) == 2 and len(removed) == 2


def test_qcompile_meta_printed_in_stable_order():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.relu.default, (x,))
    graph.output(y)
    qcompile.set_provenance(y, qcompile.Provenance("my-pass", "rule", ("x",)))
    qcompile.set_qspec(y, "int8")
    text = qcompile.print_graph(graph, show_provenance=True)
    assert "{qc.provenance=my-pass/rule from x, qc.qspec=int8}" in text
    assert "qc.provenance" not in qcompile.print_graph(graph)
