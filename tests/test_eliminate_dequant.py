"""eliminate-dequant (passes/eliminate_dequant.py): dequantize sinks below shape ops; dequantize -> quantize with equal qparams folds."""

import torch
from qcompile.passes import Convert, EliminateDequant

import qcompile
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyConvNet, TinyTokenEncoder
from tests.quant_stages import cleaned, qdq


def test_dequantize_sinks_below_max_pool_and_flatten():
    image = torch.randn(2, 1, 8, 8)
    before = qdq(TinyConvNet(), image)
    after = assert_pass_contract(EliminateDequant(), before, [image])
    check_graph(after, """
    CHECK: qc.quantize.default({{%[0-9]+}}, {{.*}}) : u8[s0,8,s1,s2]
    CHECK-NEXT: aten.max_pool2d.default({{%[0-9]+}}, [2, 2]) : u8[s0,8,(s1//2),(s2//2)]
    CHECK-NEXT: qc.dequantize.default
    CHECK: aten.flatten.using_ints({{%[0-9]+}}, 1) : u8[s0,{{.+}}]
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
    CHECK: aten.relu.default({{%[0-9]+}}) : f32[s0,64,{{[^,]+}},{{[^,]+}}]
    CHECK: qc.quantize.default({{.*}}) : u8[s0,64,{{[^,]+}},{{[^,]+}}]
    CHECK-NEXT: aten.max_pool2d.default({{%[0-9]+}}, [3, 3], [2, 2], [1, 1]) : u8[s0,64,{{[^,]+}},{{[^,]+}}]
    """)
    assert_outputs_close(before, after, [image], rtol=0)


def _token_encoder_qdq(table_granularity=None):
    """TinyTokenEncoder in Q/DQ form, calibrated on integer token batches."""
    from qcompile.passes import Annotate, InsertObservers

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    qconfig = qcompile.int8_preset()
    if table_granularity is not None:
        weight = qcompile.QuantSpec("int8", symmetric=True, granularity=table_granularity)
        qconfig = qconfig.set_op("embedding", qcompile.OpQuantConfig(None, weight))
    observed = InsertObservers()(Annotate(qconfig=qconfig)(cleaned(TinyTokenEncoder(), ids)).graph_module).graph_module
    qcompile.calibrate(observed, [(torch.randint(0, 50, (2, 8)),) for _ in range(3)], ((ids,), {}), progress=False)
    return Convert()(observed).graph_module, ids


def test_a_per_row_table_is_looked_up_in_int8_and_dequantized_with_the_rows_own_scales():
    before, ids = _token_encoder_qdq()
    after = assert_pass_contract(EliminateDequant(), before, [ids])
    check_graph(after, """
    CHECK: %1 = constant tokens_weight_q : i8[50,16]
    CHECK-NEXT: %2 = aten.reshape.default(%0, [-1]) : i64[s0*s1]
    CHECK-NEXT: %3 = aten.index_select.default(%1, 0, %2) : i8[s0*s1,16]
    CHECK-NEXT: %4 = constant tokens_weight_scale : f32[50]
    CHECK-NEXT: %5 = aten.index_select.default(%4, 0, %2) : f32[s0*s1]
    CHECK-NEXT: %6 = constant tokens_weight_zero_point : i32[50]
    CHECK-NEXT: %7 = aten.index_select.default(%6, 0, %2) : i32[s0*s1]
    CHECK-NEXT: %8 = qc.dequantize.default(%3, %5, %7, 0, torch.float32) : f32[s0*s1,16]
    CHECK-NEXT: %9 = aten.sym_size.int(%0, 0) : sym_int
    CHECK-NEXT: %10 = aten.sym_size.int(%0, 1) : sym_int
    CHECK-NEXT: %11 = aten.view.default(%8, [%9, %10, 16]) : f32[s0,s1,16]
    CHECK-NOT: aten.embedding.default(%{{[0-9]+}}, %0)
    """)
    # the same multiplications on the same rows: bit for bit
    assert_outputs_close(before, after, [ids], rtol=0)
    assert EliminateDequant()(before).stats["gathered"] == 1


def test_a_per_tensor_table_moves_its_dequantize_below_the_lookup():
    before, ids = _token_encoder_qdq(qcompile.PerTensor())
    after = EliminateDequant()(before).graph_module
    check_graph(after, """
    CHECK: %2 = aten.embedding.default(%1, %0) : i8[s0,s1,16]
    CHECK: %5 = qc.dequantize.default(%2, %3, %4, None, torch.float32) : f32[s0,s1,16]
    """)
    assert_outputs_close(before, after, [ids], rtol=0)
