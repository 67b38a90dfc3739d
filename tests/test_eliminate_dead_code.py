"""eliminate-dead-code (passes/eliminate_dead_code.py): unused pure values go; in-place writes and side effects stay."""

import torch
from qcompile.passes import EliminateDeadCode
from torch import nn

import qcompile
from qcompile.testing import (
    assert_graph_diff,
    assert_outputs_close,
    assert_pass_contract,
)


class Leftovers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        buffer = torch.zeros_like(x)
        buffer.add_(x)  # an in-place write: impure, stays even though nothing reads it after
        self.unused(x)  # computed and thrown away
        return self.fc(x) + buffer


def test_structure_unused_linear_goes_in_place_write_stays():
    gm = qcompile.capture(Leftovers().eval(), (torch.randn(2, 3),))
    out = EliminateDeadCode()(gm).graph_module
    assert_graph_diff(
        gm,
        out,
        removed=[
            "%unused_weight = constant unused.weight",
            "%unused_bias = constant unused.bias",
            "%linear = aten.linear.default(%x, %unused_weight, %unused_bias)",
        ],
    )
    assert "aten.add_.Tensor" in qcompile.print_graph(out)


def test_numerics_and_contract():
    x = torch.randn(4, 3)
    model = Leftovers().eval()
    gm = qcompile.capture(model, (x,))
    out = assert_pass_contract(EliminateDeadCode(), gm, example_args=(x,))
    assert assert_outputs_close(gm, out, (x,), rtol=0.0) == 0.0


def test_nothing_dead_means_not_modified():
    gm = EliminateDeadCode()(qcompile.capture(Leftovers().eval(), (torch.randn(2, 3),))).graph_module
    result = EliminateDeadCode()(gm)
    assert not result.modified and result.stats == {}
