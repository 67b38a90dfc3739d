"""relax-views (passes/relax_views.py): views after kernels become reshapes; others stay views."""

import pytest
import torch
from qcompile.passes import RelaxViews
from torch import nn

import qcompile
from qcompile.testing import assert_graph_diff, assert_pass_contract


class ViewsEverywhere(nn.Module):
    """A view of the input (no kernel above it) and a view of a convolution's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x.view(x.shape[0], 3, 8, 8)))
        return self.fc(y.view(y.shape[0], -1))


@pytest.fixture(scope="module")
def lowered_without_relaxing():
    data = [(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    qm = qcompile.compile(ViewsEverywhere().eval(), calibration_data=data, progress=False)
    lower = qcompile.get_target("cpu-int8").lower.replace("relax-views,", "")
    before = qcompile.PassManager(lower, initial_properties={"qdq"})(qm.qdq_graph_module).graph_module
    return qm, before, data[0][0]


def test_structure_the_view_after_the_kernel_becomes_a_reshape_the_input_view_stays(lowered_without_relaxing):
    _, before, _ = lowered_without_relaxing
    after = assert_pass_contract(RelaxViews(), before)
    assert_graph_diff(before, after,
                      added=["%view_1 = aten.reshape.default(%conv2d_int8_default"],
                      removed=["%view_1 = aten.view.default(%conv2d_int8_default"])
    views = [n for n in after.graph.nodes if n.target == torch.ops.aten.view.default]
    assert [v.args[0].target for v in views] == [torch.ops.qc.quantize.default]  # the input's, above every kernel


def test_numbers_the_channels_last_kernel_output_fails_a_view_and_reshapes_exactly(lowered_without_relaxing):
    qm, before, x = lowered_without_relaxing
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        before(x)
    after = RelaxViews()(before).graph_module
    assert torch.equal(after(x), qm.graph_module(x))
    torch.testing.assert_close(after(x), qm.qdq_graph_module(x), rtol=0.05, atol=0.05)


def test_negative_a_graph_without_kernels_is_left_alone():
    gm = qcompile.capture(ViewsEverywhere().eval(), (torch.randn(2, 3, 8, 8),))
    result = RelaxViews()(gm)
    assert not result.modified and result.stats == {}
