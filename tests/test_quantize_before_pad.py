"""quantize-before-pad: a one-sided pad between int8 convolutions runs on the integers."""

import torch

import qcompile
from qcompile.passes.quantize_before_pad import QuantizeBeforePad
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph


class TfSamePadding(torch.nn.Module):
    """MobileNet's stride-2 block as HF writes it: ReLU6, then a pad on one side, then the conv."""

    def __init__(self, second_user: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.second_user = second_user

    def forward(self, x):
        padded = torch.nn.functional.pad(torch.nn.functional.relu6(self.a(x)), [0, 1, 0, 1])
        out = self.b(padded)
        return out + padded.mean() if self.second_user else out


def compiled(model):
    return qcompile.compile(model, calibration_data=[(torch.randn(4, 3, 12, 12),) for _ in range(3)], progress=False)


def test_the_pad_moves_after_the_quantize_with_the_zero_point_as_its_value():
    qm = compiled(TfSamePadding())
    x = torch.randn(2, 3, 12, 12)
    out = assert_pass_contract(QuantizeBeforePad(), qm.qdq_graph_module, [x])
    check_graph(out, """
    CHECK: aten.relu6.default
    CHECK: qc.quantize.default
    CHECK-NEXT: aten.constant_pad_nd.default({{%[0-9]+}}, [0, 1, 0, 1], {{[0-9]+}}) : u8
    CHECK-NOT: aten.pad
    """)
    assert assert_outputs_close(qm.qdq_graph_module, out, (x,), rtol=0.0) == 0.0  # the same integers


def test_the_first_convolution_then_writes_uint8_and_agrees_with_the_qdq_graph():
    qm = compiled(TfSamePadding())
    check_graph(qm.graph_module, """
    CHECK: qc.conv2d_int8.default({{.*}}'relu6') : u8
    CHECK-NEXT: aten.constant_pad_nd.default
    CHECK: qc.conv2d_int8.default
    """)
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qm.qdq_graph_module(x), rtol=0.0, atol=1e-4)


def test_a_pad_other_ops_read_stays_float():
    qm = compiled(TfSamePadding(second_user=True))
    out = QuantizeBeforePad()(qm.qdq_graph_module).graph_module
    check_graph(out, "CHECK: aten.pad.default\nCHECK: qc.quantize.default\nCHECK-NOT: aten.constant_pad_nd")
