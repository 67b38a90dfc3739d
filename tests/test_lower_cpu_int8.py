"""lower-cpu-int8 (passes/lower_cpu_int8.py): Q/DQ groups become oneDNN kernels with the output dtype their consumers want."""

import torch
from qcompile.passes import Convert, EliminateDequant
from qcompile.pipeline import Diagnostic
from qcompile.targets.cpu_int8 import FusePatterns, LowerCpuInt8

import qcompile
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyBlock, TinyConvNet
from qcompile.qconfig import INT8_WEIGHT, TOKEN_ACTIVATION
from tests.quant_stages import calibrated, qdq


def fused_qdq(model, x):
    return FusePatterns()(EliminateDequant()(qdq(model, x)).graph_module).graph_module


def test_linear_groups_lower_with_fused_gelu_uint8_output_and_residual_add():
    x = torch.randn(4, 16)
    before = fused_qdq(TinyBlock(), x)
    after = assert_pass_contract(LowerCpuInt8(), before, [x])
    check_graph(after, """
    CHECK: qc.linear_int8.default({{.*}}, None, {{[0-9.e-]+}}, {{[0-9]+}}, torch.uint8, 'gelu') : u8[s0,32]
    CHECK: qc.linear_int8.default({{%[0-9]+}}, {{.*}}, %0, 1.0, 0, torch.float32, 'none') : f32[s0,16]
    CHECK: aten.layer_norm.default
    """, names="canonical")
    # the kernels compute what the reference Q/DQ graph computes, up to one uint8 step of rounding
    assert_outputs_close(before, after, [x], rtol=0.02)


def test_linears_on_activations_quantized_per_token_read_each_row_s_scale_and_zero_point():
    # Dynamic int8: every linear's input quantized at run time with its rows' own ranges; the
    # kernel takes the [rows, 1] parameters the quantize used, and writes float for the next one.
    x = torch.randn(4, 16)
    token = qcompile.int8_preset()
    token.by_op["linear"] = qcompile.OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)
    converted = Convert()(calibrated(TinyBlock(), x, qconfig=token)).graph_module
    before = FusePatterns()(EliminateDequant()(converted).graph_module).graph_module
    after = assert_pass_contract(LowerCpuInt8(), before, [x])
    check_graph(after, """
    CHECK: %0 = input x
    CHECK-NEXT: %1 = qc.choose_qparams_per_token.default(%0, 0, 255, False)
    CHECK-NEXT: %2 = operator.getitem(%1, 0) : f32[s0,1]
    CHECK-NEXT: %3 = operator.getitem(%1, 1) : i32[s0,1]
    CHECK-NEXT: %4 = qc.quantize.default(%0, %2, %3, None, 0, 255, torch.uint8)
    CHECK: %8 = qc.linear_int8.default(%4, %2, %3, %5, %6, %7, None, 1.0, 0, torch.float32, 'gelu') : f32[s0,32]
    CHECK-NEXT: %9 = qc.choose_qparams_per_token.default(%8, 0, 255, False)
    CHECK: qc.linear_int8.default(%12, %10, %11, {{.*}}, %0, 1.0, 0, torch.float32, 'none') : f32[s0,16]
    """, names="canonical")
    assert "aten.linear" not in qcompile.print_graph(after)
    assert_outputs_close(before, after, [x], rtol=1e-4)  # float outputs: no requantizing step between


def test_conv_lowers_and_max_pool_runs_on_uint8_in_its_own_kernel():
    image = torch.randn(2, 1, 8, 8)
    before = fused_qdq(TinyConvNet(), image)
    after = LowerCpuInt8()(before).graph_module
    check_graph(after, """
    CHECK: qc.conv2d_int8.default({{.*}}, [1, 1], [1, 1], [1, 1], 1, {{.*}}, torch.uint8, 'relu') : u8[s0,8,s1,s2]
    CHECK-NEXT: qc.max_pool2d_uint8.default({{%[0-9]+}}, [2, 2], [2, 2], [0, 0]) : u8[s0,8,(s1//2),(s2//2)]
    CHECK: qc.conv2d_int8.default({{.*}}, torch.uint8, 'relu') : u8[s0,16,(s1//2),(s2//2)]
    CHECK: aten.flatten.using_ints
    CHECK: qc.linear_int8.default({{.*}}, torch.float32, 'none') : f32[s0,10]
    """)
    assert_outputs_close(before, after, [image], rtol=0.02)


def test_resnet_block_ends_lower_to_convolutions_that_sum_the_uint8_identity(resnet):
    image = torch.rand(2, 3, 64, 64)
    before = fused_qdq(resnet, image)
    after = assert_pass_contract(LowerCpuInt8(), before, [image])
    kernels = [n for n in after.graph.nodes if n.target == torch.ops.qc.conv2d_int8.default]
    summing = [n for n in kernels if n.args[6] is not None]
    assert len(kernels) == 20 and len(summing) == 8
    assert all(n.args[6].meta["val"].dtype == torch.uint8 for n in summing)
    # every block but the last hands uint8 to the next convolution; the last feeds the float pool
    assert [n.meta["val"].dtype for n in summing] == [torch.uint8] * 7 + [torch.float32]
    text = qcompile.print_graph(after)
    assert "aten.add.Tensor" not in text and "aten.relu" not in text
    # the stem convolution writes uint8 and the pool after it reads bytes
    assert kernels[0].meta["val"].dtype == torch.uint8
    assert "qc.max_pool2d_uint8.default" in text
    assert_outputs_close(before, after, [image], rtol=0.05)


def test_a_linear_that_fits_no_kernel_stays_in_reference_form_with_the_reason():
    x = torch.randn(4, 16)
    before = fused_qdq(TinyBlock(), x)
    weight_dq = next(n for n in before.graph.nodes if n.target == torch.ops.qc.dequantize.default and n.args[3] == 0)
    affine = qcompile.add_constant(before, torch.ones(32, dtype=torch.int32), "affine_zero_point", before=weight_dq)
    weight_dq.update_arg(2, affine)  # an affine weight: oneDNN's kernels take symmetric ones only
    result = LowerCpuInt8()(before)
    assert result.stats == {"lowered": 1}
    assert result.diagnostics == (Diagnostic("linear", "kept", "weight is not int8 symmetric per output channel"),)
    assert any(n.target == torch.ops.aten.linear.default for n in result.graph_module.graph.nodes)


def test_quantized_model_keeps_its_int8_weights_not_float_ones():
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16),)], progress=False)
    dtypes = {t.dtype for t in qm.graph_module.buffers()}
    assert torch.int8 in dtypes
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for t in qm.graph_module.buffers())
