"""fuse-patterns (passes/fuse_patterns.py): marks kernel groups, changes nothing else."""

import torch
from qcompile.targets.cpu_int8 import FusePatterns

import qcompile
from qcompile.testing import assert_pass_contract, check_graph
from tests.models import TinyBlock, TinyConvNet
from tests.quant_stages import cleaned


def test_marks_linear_gelu_and_linear_residual_add():
    x = torch.randn(4, 16)
    out = assert_pass_contract(FusePatterns(), cleaned(TinyBlock(), x), [x])
    check_graph(out, """
    CHECK: aten.linear.default{{.*}}qc.fusion=fuse(gelu->gelu)
    CHECK: aten.linear.default{{.*}}qc.fusion=fuse(add->add)
    """)
    assert qcompile.print_graph(out).count("qc.fusion") == 2


def test_conv_relu_fuses_but_not_through_a_second_user():
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y  # y is needed outside the group: relu cannot join

    x = torch.randn(2, 8)
    fused = FusePatterns()(cleaned(TwoUsers(), x)).graph_module
    anchor = next(n for n in fused.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert qcompile.get_fusion(anchor) == qcompile.Fusion(last=anchor.name)
    image = torch.randn(2, 1, 8, 8)
    conv = FusePatterns()(cleaned(TinyConvNet(), image)).graph_module
    check_graph(conv, "CHECK: aten.conv2d.default{{.*}}fuse(relu->relu)\nCHECK: aten.conv2d.default{{.*}}fuse(relu->relu_1)")


def test_conv_residual_add_relu_is_one_group(resnet):
    image = torch.randn(2, 3, 32, 32)
    out = assert_pass_contract(FusePatterns(), cleaned(resnet, image), [image])
    check_graph(out, """
    CHECK: aten.conv2d.default{{.*}}fuse(relu->relu)
    CHECK: aten.conv2d.default{{.*}}fuse(relu->relu_1)
    CHECK: aten.conv2d.default{{.*}}fuse(add+relu->relu_2)
    """)
    assert qcompile.print_graph(out).count("fuse(add+relu") == 8  # every block end of ResNet-18


def test_relu6_after_a_conv_or_a_linear_is_its_epilogue_and_the_output_stays_uint8():
    """MobileNet's conv -> ReLU6 (hardtanh(0, 6)) -> conv: one kernel writing uint8 for the next,
    equal to the Q/DQ graph; a clamp to other bounds is no ReLU6 and stays a float op."""
    class Relu6Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.c, self.relu6 = torch.nn.Conv2d(16, 16, 1), torch.nn.ReLU6()
            self.fc, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            y = self.b(torch.nn.functional.relu6(self.a(x) * 3))  # a's relu6 is after a multiply: float
            y = torch.clamp(self.c(self.relu6(self.b(y))), -1.0, 6.0)  # nn.ReLU6 is hardtanh(0, 6)
            return self.head(torch.nn.functional.relu6(self.fc(y.mean((2, 3)))))

    model = Relu6Net().eval()
    batches = [(torch.randn(4, 3, 10, 10),) for _ in range(3)]
    qm = qcompile.compile(model, calibration_data=batches, progress=False)
    check_graph(qm.graph_module, """
    CHECK: qc.conv2d_int8.default({{.*}}'none') : f32
    CHECK: aten.relu6.default
    CHECK: qc.conv2d_int8.default({{.*}}'relu6') : u8
    CHECK: qc.conv2d_int8.default({{.*}}'none') : f32
    CHECK: aten.clamp.default
    CHECK: qc.linear_int8.default({{.*}}'relu6') : u8
    """)
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qm.qdq_graph_module(x), rtol=0.0, atol=1e-3)
