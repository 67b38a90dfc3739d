"""oneDNN int8 kernels against the reference Q/DQ ops: the equation the CPU lowering relies on."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import native
from qcompile.spec import PerChannel, QuantSpec, compute_qparams
from qcompile.targets.cpu_features import has_exact_int8_gemm
from qcompile.targets.cpu_int8.capabilities import BY_KERNEL, KERNEL_WEIGHT_DTYPE, POST_OPS
from qcompile.targets.cpu_int8.onednn import reference_linear_int8

qc = torch.ops.qc
ACT = QuantSpec("uint8", symmetric=False)
WEIGHT = QuantSpec(KERNEL_WEIGHT_DTYPE, granularity=PerChannel(0))  # int7 on a CPU without VNNI


def quantized_problem(rows=64, features=96, outputs=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g) * 2 + 0.5
    w = torch.randn(outputs, features, generator=g) * 0.1
    b = torch.randn(outputs, generator=g)
    x_scale, x_zp = compute_qparams(x.min(), x.max(), ACT)
    w_scale, w_zp = compute_qparams(w.amin(1), w.amax(1), WEIGHT)
    x_q = qc.quantize(x, x_scale, x_zp, None, 0, 255, torch.uint8)
    w_q = qc.quantize(w, w_scale, w_zp, 0, -128, 127, torch.int8)
    reference_input = qc.dequantize(x_q, x_scale, x_zp, None, torch.float32)
    reference_weight = qc.dequantize(w_q, w_scale, w_zp, 0, torch.float32)
    return x_q, x_scale, x_zp, w_q, w_scale, b, reference_input, reference_weight


def qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, *, other=None, out_scale=1.0, out_zero_point=0,
            out_dtype=torch.float32, post_op="none"):
    return qc.linear_int8(x_q, x_scale, x_zp, w_q, w_scale, b, other, float(out_scale), int(out_zero_point),
                          out_dtype, post_op)


@pytest.mark.parametrize("post_op, activation", [("none", lambda y: y), ("relu", F.relu), ("gelu", F.gelu),
                                                  ("gelu-tanh", lambda y: F.gelu(y, approximate="tanh")),
                                                  ("relu6", lambda y: F.hardtanh(y, 0.0, 6.0))])
@pytest.mark.parametrize("rows", [3, 64])  # the few-row VNNI kernel's own epilogues, and oneDNN's post-ops
def test_float_output_matches_dequantize_linear_reference(post_op, activation, rows):
    x_q, x_scale, x_zp, w_q, w_scale, b, ref_x, ref_w = quantized_problem(rows=rows)
    expected = activation(F.linear(ref_x, ref_w, b))
    actual = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, post_op=post_op)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_uint8_output_within_one_step_of_reference_requantize():
    x_q, x_scale, x_zp, w_q, w_scale, b, ref_x, ref_w = quantized_problem(seed=1)
    y = F.linear(ref_x, ref_w, b)
    out_scale, out_zp = compute_qparams(y.min(), y.max(), ACT)
    expected = qc.quantize(y, out_scale, out_zp, None, 0, 255, torch.uint8)
    actual = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b,
                     out_scale=out_scale, out_zero_point=int(out_zp), out_dtype=torch.uint8)
    assert actual.dtype == torch.uint8
    assert (actual.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("kernel", ["linear_int8", "conv2d_int8"])
def test_a_full_range_int8_weight_is_exact_with_vnni_and_refused_without(kernel):
    # Without VNNI oneDNN adds pairs of u8·s8 products in saturating int16: 255·(-128)·2 does not
    # fit, and the kernel would answer hundreds off (measured on a Zen 1). It refuses such a weight.
    problem = list(quantized_problem() if kernel == "linear_int8" else quantized_conv_problem())
    x_q, x_scale, x_zp, w_q, w_scale, b = problem[:6]
    x_q = torch.full_like(x_q, 255)
    w_q = torch.where(torch.arange(w_q.shape[0]).reshape(-1, *[1] * (w_q.dim() - 1)) % 2 == 0, -128, 127).to(
        torch.int8).expand_as(w_q).contiguous()
    run, reference = (qlinear, F.linear) if kernel == "linear_int8" else (qconv, lambda x, w, b: F.conv2d(x, w, b, 2, 1))
    expected = reference(qc.dequantize(x_q, x_scale, x_zp, None, torch.float32),
                         qc.dequantize(w_q, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0, torch.float32), b)
    if has_exact_int8_gemm():
        torch.testing.assert_close(run(x_q, x_scale, x_zp, w_q, w_scale, b), expected, rtol=1e-4, atol=1e-3)
    else:
        with pytest.raises(ValueError, match=f"{kernel}: a weight value of magnitude 128 on a CPU without VNNI"):
            run(x_q, x_scale, x_zp, w_q, w_scale, b)


def test_three_dimensional_activations_and_bf16_output():
    x_q, x_scale, x_zp, w_q, w_scale, b, ref_x, ref_w = quantized_problem()
    out = qlinear(x_q.reshape(4, 16, -1), x_scale, x_zp, w_q, w_scale, b,
                  out_dtype=torch.bfloat16)
    assert out.shape == (4, 16, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().reshape(64, 48), F.linear(ref_x, ref_w, b), rtol=1e-2, atol=2e-2)


def test_bad_arguments_are_named():
    x_q, x_scale, x_zp, w_q, w_scale, b, *_ = quantized_problem()
    with pytest.raises(ValueError, match="activations must be uint8"):
        qlinear(x_q.to(torch.int8), x_scale, x_zp, w_q, w_scale, b)
    with pytest.raises(ValueError, match="post-op 'swish' is not one it fuses"):
        qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, post_op="swish")
    # oneDNN follows a residual add with relu only: the capability table says so, the kernel refuses.
    with pytest.raises(ValueError, match="post-op 'gelu' after a residual add is not one it fuses .*none, relu"):
        qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, other=torch.randn(64, 48), post_op="gelu")
    with pytest.raises(ValueError, match="weights must be 2-D int8"):
        qlinear(x_q, x_scale, x_zp, w_q.float(), w_scale, b)


def test_fused_residual_add_then_relu():
    x_q, x_scale, x_zp, w_q, w_scale, b, ref_x, ref_w = quantized_problem(seed=2)
    other = torch.randn(64, 48)
    expected = F.relu(F.linear(ref_x, ref_w, b) + other)
    actual = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, other=other, post_op="relu")
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(other, other.clone())  # the addend is read, never accumulated into


@pytest.mark.parametrize("rows", [1, 64])  # the few-row kernel's VNNI blocks and oneDNN's blocked layout
def test_a_weight_is_packed_once_again_after_an_in_place_write_and_released_with_it(rows):
    x_q, x_scale, x_zp, w_q, w_scale, b, ref_x, ref_w = quantized_problem()
    x_q, w_q = x_q[:rows], w_q.clone()
    before = native.packs_made()
    first = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b)
    torch.testing.assert_close(qlinear(x_q, x_scale, x_zp, w_q, w_scale, b), first)
    assert native.packs_made() == before + 1  # the second call read the cached pack
    with torch.no_grad():
        w_q.neg_()  # a user's in-place write: the stale pack would give the old outputs
    flipped = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b)
    assert native.packs_made() == before + 2
    torch.testing.assert_close(flipped, F.linear(ref_x[:rows], -ref_w, b), rtol=1e-4, atol=1e-4)
    live = native.packed_weights()
    del w_q
    assert native.packed_weights() == live - 1


@pytest.mark.parametrize("kernel", ["linear_int8", "conv2d_int8"])
def test_the_kernels_fuse_exactly_the_post_ops_the_capability_table_names(kernel):
    """The capability table (what fuse-patterns groups) and the kernels' own table (how oneDNN runs
    each post-op) agree: every listed post-op runs, every other one is refused."""
    anchor = BY_KERNEL[kernel]
    x_q, x_scale, x_zp, w_q, w_scale, b, *_ = quantized_problem() if kernel == "linear_int8" else quantized_conv_problem()
    run = qlinear if kernel == "linear_int8" else qconv
    for with_add in (False, True):
        other = run(x_q, x_scale, x_zp, w_q, w_scale, b) if with_add else None
        for post_op in POST_OPS:
            if post_op in anchor.post_ops(with_add):
                run(x_q, x_scale, x_zp, w_q, w_scale, b, other=other, post_op=post_op)
            else:
                with pytest.raises(ValueError, match=f"post-op '{post_op}'.* is not one it fuses"):
                    run(x_q, x_scale, x_zp, w_q, w_scale, b, other=other, post_op=post_op)


def quantized_conv_problem(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(2, 8, 12, 12, generator=g))
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.2
    b = torch.randn(16, generator=g)
    x_scale, x_zp = compute_qparams(x.min(), x.max(), ACT)
    w_scale, w_zp = compute_qparams(w.amin((1, 2, 3)), w.amax((1, 2, 3)), WEIGHT)
    x_q = qc.quantize(x, x_scale, x_zp, None, 0, 255, torch.uint8)
    w_q = qc.quantize(w, w_scale, w_zp, 0, -128, 127, torch.int8)
    y = F.conv2d(qc.dequantize(x_q, x_scale, x_zp, None, torch.float32),
                 qc.dequantize(w_q, w_scale, w_zp, 0, torch.float32), b, 2, 1)
    return x_q, x_scale, x_zp, w_q, w_scale, b, y


def qconv(x_q, x_scale, x_zp, w_q, w_scale, b, *, other=None, other_scale=1.0, other_zero_point=0,
          out_scale=1.0, out_zero_point=0, out_dtype=torch.float32, post_op="none"):
    return qc.conv2d_int8(x_q, x_scale, x_zp, w_q, w_scale, b, other, float(other_scale), int(other_zero_point),
                          [2, 2], [1, 1], [1, 1], 1, float(out_scale), int(out_zero_point), out_dtype, post_op)


def test_conv2d_matches_dequantize_conv_reference():
    *problem, y = quantized_conv_problem()
    torch.testing.assert_close(qconv(*problem, post_op="relu"), F.relu(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [(100, 100), (7, 33)])  # over 2**20 multiply-adds for oneDNN; the small-conv path
def test_conv2d_reads_an_image_laid_out_as_the_float_input_was_like_a_channels_last_one(channels, size):
    # A first convolution's input keeps the float image's (N, C, H, W) layout: the kernel interleaves
    # its few channels itself (more than four take ATen's copy); the answer must not depend on it.
    g = torch.Generator().manual_seed(channels)
    x_q = torch.randint(0, 256, (3, channels, *size), generator=g, dtype=torch.uint8)
    w_q = torch.randint(-127, 128, (16, channels, 3, 3), generator=g, dtype=torch.int8)
    w_scale, b = torch.rand(16, generator=g) * 0.01, torch.randn(16, generator=g)
    x_scale, x_zp = torch.tensor([0.02]), torch.tensor([7])
    weight = w_q if has_exact_int8_gemm() else w_q // 2  # int7 on a CPU without VNNI
    planar = qconv(x_q, x_scale, x_zp, weight, w_scale, b, out_scale=0.05, out_zero_point=3, out_dtype=torch.uint8)
    interleaved = qconv(x_q.contiguous(memory_format=torch.channels_last), x_scale, x_zp, weight, w_scale, b,
                        out_scale=0.05, out_zero_point=3, out_dtype=torch.uint8)
    assert torch.equal(planar, interleaved)
    reference = F.conv2d(qc.dequantize(x_q, x_scale, x_zp, None, torch.float32),
                         weight.float() * w_scale[:, None, None, None], b, 2, 1)
    expected = qc.quantize(reference, torch.tensor([0.05]), torch.tensor([3]), None, 0, 255, torch.uint8)
    assert (planar.int() - expected.int()).abs().max() <= 1


def test_conv2d_sum_post_op_adds_a_uint8_residual_and_requantizes_within_one_step():
    # ResNet's block end as one kernel: relu(conv(x) + dequantize(identity)) -> uint8.
    *problem, y = quantized_conv_problem(seed=4)
    identity = torch.relu(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    id_scale, id_zp = compute_qparams(identity.min(), identity.max(), ACT)
    identity_q = qc.quantize(identity, id_scale, id_zp, None, 0, 255, torch.uint8)
    summed = F.relu(y + qc.dequantize(identity_q, id_scale, id_zp, None, torch.float32))
    out_scale, out_zp = compute_qparams(summed.min(), summed.max(), ACT)
    expected = qc.quantize(summed, out_scale, out_zp, None, 0, 255, torch.uint8)
    kept = identity_q.clone()
    actual = qconv(*problem, other=identity_q, other_scale=id_scale, other_zero_point=id_zp,
                   out_scale=out_scale, out_zero_point=out_zp, out_dtype=torch.uint8, post_op="relu")
    assert actual.dtype == torch.uint8
    assert (actual.int() - expected.int()).abs().max() <= 1
    assert torch.equal(identity_q, kept)  # oneDNN sums into its own copy, never the caller's tensor
    floating = qconv(*problem, other=identity_q, other_scale=id_scale, other_zero_point=id_zp, post_op="relu")
    torch.testing.assert_close(floating, summed, rtol=1e-4, atol=1e-4)


def test_conv2d_uint8_output_refuses_a_float_residual():
    *problem, y = quantized_conv_problem()
    with pytest.raises(ValueError, match="uint8 output adds a uint8 other, got torch.float32"):
        qconv(*problem, other=torch.zeros_like(y), out_scale=0.1, out_dtype=torch.uint8)


def test_one_capability_table_feeds_the_op_rules_the_marking_and_the_kernels():
    from qcompile.targets.cpu_int8 import capabilities
    from qcompile.targets.cpu_int8.fuse_patterns import fusion_group
    from qcompile.targets.cpu_int8.onednn import INT8_KERNELS

    target = qcompile.get_target("cpu-int8")
    anchors = capabilities.ANCHORS.values()
    assert {a.kind for a in anchors} <= set(target.op_rules)
    assert target.op_rules["add"].epilogue_of == ("conv2d",)  # the anchor whose residual add is a sum post-op
    assert set(INT8_KERNELS.values()) == {a.kernel for a in anchors}
    gm = qcompile.capture(_ConvGelu(), (torch.randn(1, 3, 8, 8),))
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert fusion_group(conv).unary is None  # conv2d_int8 does not fuse gelu, so the marking leaves it out


class _ConvGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.gelu(self.conv(x))


@pytest.mark.parametrize("isa", native.available_isas())  # AVX512-VNNI's u8s8 kernel, or oneDNN finished in ATen
@pytest.mark.parametrize("rows", [1, 7, 200])
@pytest.mark.parametrize("post_op, out_dtype", [("none", torch.float32), ("relu", torch.bfloat16),
                                                ("gelu", torch.float32), ("relu", torch.uint8),
                                                ("gelu-tanh", torch.uint8)])
def test_activations_quantized_per_token_keep_the_contract_row_by_row(isa, rows, post_op, out_dtype):
    # Each row its own scale and zero point, as qc.quantize_per_token gives them: no per-tensor
    # int8 GEMM takes them, so the kernel must apply them row by row in its epilogue.
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 96, generator=g) * torch.logspace(-2, 1, rows)[:, None]  # rows of very different ranges
    x_q, x_scale, x_zp = qc.quantize_per_token(x, 0, 255, False, torch.uint8)
    w_q = torch.randint(-127 if has_exact_int8_gemm() else -63, 64, (40, 96), generator=g, dtype=torch.int8)
    w_scale, b, other = torch.rand(40, generator=g) / 50, torch.randn(40, generator=g), torch.randn(2, rows, 40)
    out_scale, out_zp = (0.05, 100) if out_dtype == torch.uint8 else (1.0, 0)
    if out_dtype == torch.uint8 or post_op not in ("none", "relu"):
        other = None  # a residual add goes into a float output, followed by relu at most
    with native.running_on(isa):
        actual = qlinear(x_q, x_scale, x_zp, w_q, w_scale, b, other=other, out_scale=out_scale,
                         out_zero_point=out_zp, out_dtype=out_dtype, post_op=post_op)
    expected = reference_linear_int8(x_q, x_scale, x_zp, w_q, w_scale, b, other, out_scale, out_zp, out_dtype, post_op)
    assert actual.shape == (2, rows, 40) and actual.dtype == out_dtype
    if out_dtype == torch.uint8:
        assert (actual.int() - expected.int()).abs().max() <= 1
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-2 if out_dtype == torch.bfloat16 else 1e-4)


def test_per_token_activations_need_one_scale_per_row():
    x_q, x_scale, x_zp, w_q, w_scale, b, *_ = quantized_problem(rows=6)
    with pytest.raises(ValueError, match=r"one scale and zero point per row \(6\), got 3 and 3"):
        qlinear(x_q, torch.full((3, 1), 0.1), torch.zeros(3, 1, dtype=torch.int32), w_q, w_scale, b)
