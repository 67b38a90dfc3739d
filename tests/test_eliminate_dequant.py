"""eliminate-dequant (passes/eliminate_dequant.py): dequantize sinks below shape ops; dequantize -> quantize with equal qparams folds."""

import torch
from qcompile.passes import Convert, EliminateDequant

import qcompile
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyConvNet
from tests.quant_stages import qdq


def test_dequantize_sinks_below_max_pool_and_flatten():
    image = torch.randn(2, 1, 8, 8)
    before = qdq(TinyConvNet(), image)
    after = assert_pass_contract(EliminateDequant(), before, [image])
    check_graph(after, """
    CHECK: qc.quantize.default({{%[0-9]+}}, {{.*}}) : u8[s0,8,8,8]
    CHECK-NEXT: aten.max_pool2d.default({{%[0-9]+}}, [2, 2]) : u8[s0,8,4,4]
    CHECK-NEXT: qc.dequantize.default
    CHECK: aten.flatten.using_ints({{%[0-9]+}}, 1) : u8[s0,256]
    CHECK-NEXT: qc.dequantize.default
    """)
    assert_outputs_close(before, after, [image], rtol=0)


def test_dequantize_then_quantize_with_equal_qparams_is_the_identity():
    class Requantize(torch.nn.Module):
        def forward(self, x):
            scale, zero_point = torch.tensor(0.1), torch.tensor(128, dtype=torch.int32)
            q = torch.ops.qc.quantize(x, scale, zero_point, None, 0, 255, torch.uint8)
            r = torch.ops.qc.dequantize(q, scale, zero_point, None, torch.float32)
            return torch.ops.qc.quantize(r, scale, zero_point, None, 0, 255, torch.uint8)

    x = torch.randn(4, 3)
    before = qcompile.capture(Requantize(), (x,))
    after = EliminateDequant()(before).graph_module
    check_graph(after, """
    CHECK: = qc.quantize.default
    CHECK-NOT: qc.quantize.default
    CHECK: return ({{%[0-9]+}},)
    """)
    assert after.graph.output_node().args[0][0].name == "quantize"
    assert torch.equal(before(x), after(x))


def test_per_channel_dequantize_does_not_move():
    image = torch.randn(2, 1, 8, 8)
    converted = Convert()(qdq(TinyConvNet(), image)).graph_module  # already converted: unchanged
    weights = [n for n in converted.graph.nodes if n.target == torch.ops.qc.dequantize.default and n.args[3] == 0]
    assert weights and all(u.target != torch.ops.aten.max_pool2d.default for w in weights for u in w.users)


def test_quantize_moves_above_a_max_pool_it_alone_reads(resnet):
    # ResNet's stem: conv -> relu -> max-pool -> quantize. Pooling the uint8 bytes gives the same
    # integers (quantizing is monotone) and lets the convolution write uint8.
    image = torch.rand(2, 3, 64, 64)
    before = qdq(resnet, image)
    after = assert_pass_contract(EliminateDequant(), before, [image])
    check_graph(after, """
    CHECK: aten.relu.default({{%[0-9]+}}) : f32[s0,64,32,32]
    CHECK: qc.quantize.default({{.*}}) : u8[s0,64,32,32]
    CHECK-NEXT: aten.max_pool2d.default({{%[0-9]+}}, [3, 3], [2, 2], [1, 1]) : u8[s0,64,16,16]
    """)
    assert_outputs_close(before, after, [image], rtol=0)
