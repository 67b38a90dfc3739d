"""qc.linear_w4a8: int4 groups on uint8 activations summed in integers; its contract on every
instruction set, its refusals, its packing, and the lowering that makes it from a W4A8 plan."""

import pytest
import torch

import qcompile
from qcompile import OpQuantConfig, PerGroup, QConfig, QuantSpec, native
from qcompile.kernel_check import kernel_contracts
from qcompile.ops import choose_qparams_per_token
from qcompile.passes import Convert
from qcompile.qconfig import INT8_ACTIVATION, TOKEN_ACTIVATION
from qcompile.ir.graph import op_arguments
from qcompile.qdq import SHARES_QPARAMS, DequantizeCall, is_quantize, keeps_rows
from qcompile.targets.cpu_int8 import LowerWeightOnly
from qcompile.targets.cpu_int8.weight_only_kernels import (
    dequantized_weight,
    linear_w4a8,
    linear_w4a8_bound,
    reference_linear_w4a8,
)
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyBlock, TinySelfAttention
from tests.quant_stages import calibrated


def int4_groups(outputs, inputs, size, seed, affine):
    """Weights quantized per group to [-8, 7]; with zero points when ``affine`` (ranges far from symmetric)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(outputs, inputs, generator=g) * 3 - 0.5 if affine else torch.randn(outputs, inputs, generator=g)
    grouped = weight.reshape(outputs, -1, size)
    if not affine:
        scale = grouped.abs().amax(-1, keepdim=True) / 7
        return torch.round(grouped / scale).clamp(-8, 7).to(torch.int8), scale, None
    lo, hi = grouped.amin(-1, keepdim=True).clamp(max=0), grouped.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    zero_point = (-8 - torch.round(lo / scale)).clamp(-8, 7).to(torch.int32)
    return (torch.round(grouped / scale) + zero_point).clamp(-8, 7).to(torch.int8), scale, zero_point


def uint8_rows(rows, inputs, seed, per_token=True):
    """Activations of very different scales per row, quantized to uint8 per row (or with one scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=g) * torch.logspace(-2, 2, rows).view(rows, 1) + 0.3
    scale, zero_point = choose_qparams_per_token(x if per_token else x.reshape(1, -1), 0, 255, False)
    if not per_token:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return torch.ops.qc.quantize(x, scale, zero_point, None, 0, 255, torch.uint8), scale, zero_point


def exact(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group_size, bias):
    """The contract in float64: every product an exact integer, scaled once."""
    x = (x_q.double() - x_zero_point.double()) * x_scale.double()
    w = dequantized_weight(weight_q, scale.double(), zero_point, dtype=torch.float64)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.double())


@pytest.mark.parametrize("isa", native.available_isas())
@pytest.mark.parametrize(("rows", "outputs", "inputs", "group", "affine", "per_token"), [
    (1, 48, 256, 128, False, True),    # a decode step: whole 64-weight chunks, groups folded every 128
    (2, 13, 96, 32, True, True),       # outputs not a multiple of the 4-output tile, a half chunk left over
    (3, 5, 512, 256, False, False),    # groups of 256 folded in two 128-weight parts; one activation scale
    (5, 70, 192, 64, True, True),      # a group per chunk
    (40, 33, 160, 32, True, True),     # many rows: the tile's weights reused across them
    (1, 4100, 64, 32, False, True),    # packed 4096 rows at a time: two blocks, the last one ragged
])
def test_the_kernel_keeps_its_contract_at_every_shape(isa, rows, outputs, inputs, group, affine, per_token):
    weight_q, scale, zero_point = int4_groups(outputs, inputs, group, seed=rows, affine=affine)
    x_q, x_scale, x_zero_point = uint8_rows(rows, inputs, seed=outputs, per_token=per_token)
    bias = torch.randn(outputs)
    with native.running_on(isa):
        y = linear_w4a8(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group, bias, torch.float32)
        integers = native.w4a8_in_integers()
    expected = reference_linear_w4a8(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group, bias,
                                     torch.float32)
    assert y.shape == (rows, outputs) and y.dtype == torch.float32
    error = float((y - expected).abs().max())
    assert error <= linear_w4a8_bound(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group, bias,
                                      torch.float32)
    if integers:
        # products exact, then fp32 sums of scaled integers: a few 2^-24 of S_x·S·(8 + |Z|)·Σx_q per
        # group (the largest terms), summed over the groups
        magnitude = (x_scale.reshape(-1, 1).double() * x_q.double().abs()) @ dequantized_weight(
            torch.full_like(weight_q, 8) + (0 if zero_point is None else zero_point.abs().to(torch.int8)),
            scale.double(), dtype=torch.float64).t()
        truth = exact(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group, bias)
        assert float((y.double() - truth).abs().max()) <= 2.0**-20 * float(magnitude.max() + bias.abs().max())


def test_per_token_rows_keep_their_own_scales_in_a_batch_of_sequences():
    """[batch, tokens, in] activations with [batch, tokens, 1] scales, bf16 out: each row its own."""
    weight_q, scale, zero_point = int4_groups(24, 128, 64, seed=0, affine=True)
    x_q, x_scale, x_zero_point = uint8_rows(6, 128, seed=1)
    shaped = (x_q.view(2, 3, 128), x_scale.view(2, 3, 1), x_zero_point.view(2, 3, 1))
    y = linear_w4a8(*shaped, weight_q, scale, zero_point, 64, None, torch.bfloat16)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    flat = linear_w4a8(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, 64, None, torch.float32)
    torch.testing.assert_close(y.float().view(6, 24), flat.bfloat16().float(), rtol=0, atol=0)
    assert kernel_contracts()[torch.ops.qc.linear_w4a8.default].reference is reference_linear_w4a8


def test_the_kernel_refuses_operands_outside_its_contract():
    weight_q, scale, _ = int4_groups(16, 64, 32, seed=0, affine=False)
    x_q, x_scale, x_zero_point = uint8_rows(3, 64, seed=0)
    with pytest.raises(ValueError, match="linear_w4a8 takes uint8 activations, got torch.int8"):
        linear_w4a8(x_q.to(torch.int8), x_scale, x_zero_point, weight_q, scale, None, 32, None, torch.float32)
    with pytest.raises(ValueError, match=r"x_scale takes one value per row of x \(3\) or one for all, got 2"):
        linear_w4a8(x_q, x_scale[:2], x_zero_point, weight_q, scale, None, 32, None, torch.float32)
    with pytest.raises(ValueError, match=r"linear_w4a8: x has 32 features, the weight 64"):
        linear_w4a8(x_q[:, :32], x_scale, x_zero_point, weight_q, scale, None, 32, None, torch.float32)
    with pytest.raises(ValueError, match=r"linear_w4a8: int4pack takes weights \[out, in / 32, 32\]"):
        linear_w4a8(x_q, x_scale, x_zero_point, weight_q.reshape(16, 64), scale, None, 32, None, torch.float32)
    for isa in native.available_isas():  # each path's packing checks the range
        with native.running_on(isa), pytest.raises(ValueError, match=r"int4pack takes weights in \[-8, 7\]"):
            linear_w4a8(x_q, x_scale, x_zero_point, weight_q * 2, scale, None, 32, None, torch.float32)


def test_a_weight_is_packed_once_and_again_after_an_in_place_write():
    weight_q, scale, _ = int4_groups(16, 64, 32, seed=4, affine=False)
    x_q, x_scale, x_zero_point = uint8_rows(1, 64, seed=4)

    def run():
        return linear_w4a8(x_q, x_scale, x_zero_point, weight_q, scale, None, 32, None, torch.float32)

    before = native.packs_made()
    first = run()
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    packs = native.packs_made() - before
    assert packs == 1  # the integer kernel's pack, or the int4 kernel's under it; ATen's int4pack's otherwise
    with torch.no_grad():
        scale.mul_(2)  # a scale written in place: the packed scales and row sums are stale
    torch.testing.assert_close(run(), 2 * first, rtol=1e-6, atol=1e-6)
    assert native.packs_made() - before == 2


W4A8 = QuantSpec("int4", False, PerGroup(1, 32), "mse")


@pytest.mark.parametrize("activation", [INT8_ACTIVATION, TOKEN_ACTIVATION], ids=["tensor", "token"])
def test_the_lowering_gives_the_kernel_the_activations_integers(activation):
    """quantize -> dequantize -> linear(·, grouped weight) becomes quantize -> linear_w4a8: the
    dequantize the linear read is gone, and the outputs equal the Q/DQ graph's."""
    model = TinyBlock(width=64, hidden=128)
    qconfig = QConfig(by_op={"linear": OpQuantConfig(activation, W4A8)})
    qdq = Convert()(calibrated(model, torch.randn(4, 64), qconfig=qconfig)).graph_module
    out = assert_pass_contract(LowerWeightOnly(), qdq)
    check_graph(out, """
    CHECK: qc.quantize.default
    CHECK: qc.linear_w4a8.default({{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, 32, {{%[0-9]+}}, torch.float32) : f32[{{.*}},128]
    CHECK: qc.linear_w4a8.default({{.*}}, 32, {{%[0-9]+}}, torch.float32) : f32[{{.*}},64]
    CHECK-NOT: aten.linear.default
    """)
    kernels = [n for n in out.graph.nodes if n.target == torch.ops.qc.linear_w4a8.default]
    assert len(kernels) == 2 and all(is_quantize(op_arguments(n)["x_q"]) for n in kernels)  # the integers
    assert not any((dq := DequantizeCall.of(n)) and dq.integer_dtype == torch.uint8 for n in out.graph.nodes)
    assert not any(n.target == torch.ops.qc.linear_weight_only.default for n in out.graph.nodes)
    x = torch.randn(6, 64) * torch.logspace(-1, 1, 6).view(6, 1)
    assert_outputs_close(qdq, out, [x], rtol=0.02)


@pytest.mark.parametrize(("activation", "wording"), [(INT8_ACTIVATION, "uint8"), (TOKEN_ACTIVATION, "uint8 per-token")],
                         ids=["tensor", "token"])
@pytest.mark.parametrize("isa", native.available_isas())
def test_a_w4a8_model_compiles_onto_the_kernel_says_how_it_runs_and_agrees_with_its_qdq_graph(isa, activation,
                                                                                          wording):
    """Per tensor or per token (a scale per row, chosen at run time in front of the kernel); on
    each instruction set, where the report says whether the integers are summed as integers."""
    data = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    with native.running_on(isa):
        qm = qcompile.compile(TinyBlock(width=64, hidden=128), calibration_data=data, outlier_smoothing=None,
                              qconfig=QConfig(by_op={"linear": OpQuantConfig(activation, W4A8)}), progress=False)
        how = "summed in integers" if native.w4a8_in_integers() else "dequantized for qc.linear_weight_only"
        x = torch.randn(5, 64) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]).view(5, 1)  # rows of every scale
        with torch.no_grad():
            y = qm(x)
    linears = [n for n in qm.report.nodes if n.op == "linear"]
    assert [n.detail for n in linears] == [f"qc.linear_w4a8 (groups of 32, affine), {wording} activations {how}"] * 2
    assert all(n.sqnr_db > 15 for n in linears)  # int4 groups and uint8 activations, not float
    assert qm.report.kernel_calls_checked
    with torch.no_grad():
        torch.testing.assert_close(y, qm.qdq_graph_module(x), atol=0.02 * float(y.abs().max()), rtol=0)


def test_per_token_activations_are_quantized_per_row_of_the_linears_input_not_of_a_view_above_it():
    """Attention's output reaches the output projection through transpose -> reshape: [b, heads,
    t, d] rows are heads, [b, t, heads·d] rows are tokens. A per-token scale belongs to the
    linear's rows, so the dynamic Q/DQ sits after the reshape (not hoisted above it as a per-tensor
    one may be), and the lowering gives that linear qc.linear_w4a8 too."""
    model = TinySelfAttention(width=64, heads=4)
    data = [(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    qm = qcompile.compile(model, calibration_data=data, outlier_smoothing=None, progress=False,
                          qconfig=QConfig(by_op={"linear": OpQuantConfig(TOKEN_ACTIVATION, W4A8)}))
    check_graph(qm.qdq_graph_module, """
    CHECK: aten.scaled_dot_product_attention.default
    CHECK-NEXT: aten.transpose.int
    CHECK-NEXT: aten.reshape.default({{%[0-9]+}}, [{{.*}}, 64]) : f32[{{.*}},64]
    CHECK-NEXT: qc.choose_qparams_per_token.default({{%[0-9]+}}, 0, 255, False) : (f32[{{.*}},1], i32[{{.*}},1])
    """)
    assert [n.detail.split(",")[0] for n in qm.report.nodes if n.op == "linear"] == ["qc.linear_w4a8 (groups of 32"] * 4
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qm.qdq_graph_module(x), atol=0.02 * float(qm(x).abs().max()), rtol=0)


@pytest.mark.parametrize(("shape", "op", "keeps"), [
    ((2, 4, 3, 8), lambda x: x.transpose(1, 2), True),        # heads and tokens swap: rows re-indexed
    ((2, 4, 3, 8), lambda x: x.transpose(2, 3), False),       # the last dimension moves
    ((2, 4, 3, 8), lambda x: x.permute(2, 0, 1, 3), True),
    ((2, 4, 3, 8), lambda x: x.permute(0, 1, 3, 2), False),
    ((2, 4, 3, 8), lambda x: x.reshape(8, 3, 8), True),       # rows of 8 stay rows of 8
    ((2, 4, 3, 8), lambda x: x.reshape(2, 4, 24), False),     # three rows become one
    ((2, 3, 8), lambda x: x.unsqueeze(1), True),
])
def test_keeps_rows_says_which_shape_ops_a_per_token_scale_may_cross(shape, op, keeps):
    class Shaped(torch.nn.Module):
        def forward(self, x):
            return op(x) * 2

    gm = torch.export.export(Shaped(), (torch.randn(*shape),)).module()
    shaped = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in SHARES_QPARAMS)
    assert keeps_rows(shaped) is keeps
