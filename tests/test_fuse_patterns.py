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
