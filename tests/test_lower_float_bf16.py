"""lower-float-bf16: attention to the native fused kernel (fp32) and float linears to bf16, within their rounding of
fp32; fuse-rms-norm: a written-out RMSNorm, or ATen's, to the native qc.rms_norm."""

import pytest
import torch
from qcompile.passes import Canonicalize
from qcompile.targets.cpu_int8 import FuseRmsNorm, LowerFloatBf16
from qcompile.targets.cpu_int8.fuse_rms_norm import reference_rms_norm

import qcompile
from qcompile.testing import assert_graph_diff, assert_outputs_close, assert_pass_contract, check_graph


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, q, k, v, mask):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
        return self.proj(out)


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 12:] = torch.finfo(torch.float32).min  # padding, as Hugging Face masks it
    return q, k, v, mask


def test_attention_and_float_linear_lower_to_native_and_bf16_kernels():
    args = inputs()
    before = qcompile.capture(Attention(), args)
    after = assert_pass_contract(LowerFloatBf16(linears=True), before)
    check_graph(after, """
    CHECK: qc.attention.default(%0, %1, %2, %3, None, False, torch.float32) : f32[s0,s1,s2,32]
    CHECK: constant proj_weight_bf16 : bf16[32,32]
    CHECK: qc.linear_bf16.default
    """)
    assert_outputs_close(before, after, list(args), rtol=2e-2)
    assert torch.isfinite(after(*args)).all()


def test_float_linears_go_to_bf16_only_on_a_cpu_that_multiplies_bf16_natively(monkeypatch):
    # Without AVX512-BF16 / AMX oneDNN converts bf16 to fp32 first: 5-7x slower than the fp32 GEMM.
    from qcompile.targets import cpu_features

    before = qcompile.capture(Attention(), inputs())
    for flags, lowered in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx512f", "avx512_bf16"}), True)):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda flags=flags: flags)
        after = LowerFloatBf16()(before).graph_module
        assert any(n.target == torch.ops.qc.linear_bf16.default for n in after.graph.nodes) == lowered
        assert any(n.target == torch.ops.qc.attention.default for n in after.graph.nodes)


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_causal_grouped_query_attention_lowers_and_keeps_fp32_results():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 8, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    before = qcompile.capture(Causal(), (q, k, v))
    after = assert_pass_contract(LowerFloatBf16(), before)
    check_graph(after, """
    CHECK: qc.attention.default(%0, %1, %2, None, None, True, torch.float32)
    """)
    assert_outputs_close(before, after, [q, k, v], rtol=1e-5)


class RepeatedHeads(torch.nn.Module):
    """Grouped-query attention as transformers' Llama/Qwen write it: each key/value head repeated
    n times (repeat_kv) before SDPA, so a decode step copies its cache n times per layer."""

    def forward(self, q, k, v):
        def repeat_kv(x, n):
            b, g, length, d = x.shape
            return x[:, :, None, :, :].expand(b, g, n, length, d).reshape(b, g * n, length, d)

        return torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)


def test_repeated_key_value_heads_are_read_shared_by_the_kernel():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 8, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    before = qcompile.capture(RepeatedHeads(), (q, k, v))
    after = assert_pass_contract(LowerFloatBf16(), before)
    check_graph(after, """
    CHECK-NOT: aten.expand
    CHECK: qc.attention.default(%0, %1, %2, None, None, True, torch.float32)
    """)
    assert_outputs_close(before, after, [q, k, v], rtol=1e-5)
    assert LowerFloatBf16()(before).stats["grouped-query heads read shared"] == 1


def test_attention_without_heads_stays_with_the_reason():
    class Unbatched(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(3, 10, 8) for _ in range(3))
    result = LowerFloatBf16()(qcompile.capture(Unbatched(), (q, k, v)))
    assert result.of_kind("kept") == {
        "scaled_dot_product_attention": "attention stays on ATen's kernel: not [batch, heads, length, depth]"}


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        heads = [p(x).view(x.shape[0], -1, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v)]
        context = torch.nn.functional.scaled_dot_product_attention(*heads)
        return self.out(context.transpose(1, 2).reshape(x.shape[0], -1, 32))


def test_int8_self_attention_reads_the_merged_projection_in_place():
    batches = [(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    qm = qcompile.compile(SelfAttention(), calibration_data=batches, progress=False, outlier_smoothing=None)
    # q, k and v run as one merged fp32 GEMM (merge-sibling-linears) whose slices, viewed as heads,
    # are the attention's operands: no copy between them (the attention, quantized for the output
    # projection, is fuse-attention-quantize's)
    check_graph(qm.graph_module, """
    CHECK: qc.linear_int8.default({{.*}}, torch.float32, 'none') : f32[s0,s1,96]
    CHECK-NEXT: aten.slice.Tensor{{.*}} : f32[s0,s1,32]
    CHECK: aten.transpose.int{{.*}} : f32[s0,4,s1,8]
    CHECK: qc.attention_quantize.default({{.*}}, False, None, {{.*}}, torch.uint8) : u8[s0,4,s1,8]
    """)
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(qm(x), SelfAttention()(x), rtol=0.05, atol=0.05)


def canonical(model, *args):
    return Canonicalize()(qcompile.capture(model, args)).graph_module


class RmsNormed(torch.nn.Module):
    """transformers' LlamaRMSNorm / Qwen2RMSNorm, twice: γ on the left (theirs) and on the right."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.weight, self.other = torch.nn.Parameter(torch.rand(24) + 0.5), torch.nn.Parameter(torch.rand(24))

    def forward(self, x):
        hidden = x.to(torch.float32)
        y = self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        z = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.other
        squares = z.pow(2).mean(-1, keepdim=True)
        out = z * torch.rsqrt(squares + 1e-5) * self.other + squares  # read elsewhere: this one stays written out
        return out * 3  # a multiply by a number is no RMSNorm


def test_a_written_out_rms_norm_becomes_the_native_one():
    x = torch.randn(2, 5, 24)
    before = canonical(RmsNormed(), x)
    after = assert_pass_contract(FuseRmsNorm(), before)
    check_graph(after, """
    CHECK: qc.rms_norm.default(%0, {{%[0-9]+}}, 1e-06)
    CHECK: qc.rms_norm.default({{%[0-9]+}}, {{%[0-9]+}}, 1e-05)
    CHECK-NOT: qc.rms_norm
    CHECK: aten.rsqrt
    """)
    assert_outputs_close(before, after, [x], rtol=1e-6)
    assert FuseRmsNorm()(before).stats == {"rms-norm": 1, "rms-norm-weight-last": 1}


class AtenRmsNorms(torch.nn.Module):
    """nn.RMSNorm (ATen's op, γ and the default ε), one without γ, and one over two dimensions (kept)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.norm = torch.nn.RMSNorm(24)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        y = torch.nn.functional.rms_norm(self.norm(x), [24], eps=1e-5)
        return torch.nn.functional.rms_norm(y, [5, 24])


def test_atens_rms_norm_over_the_last_dimension_becomes_the_native_one():
    x = torch.randn(2, 5, 24)
    before = canonical(AtenRmsNorms(), x)
    after = assert_pass_contract(FuseRmsNorm(), before)
    eps = torch.finfo(torch.float32).eps
    assert_graph_diff(before, after, removed=[
        "aten.rms_norm.default(%x, [24], %norm_weight)",
        "aten.rms_norm.default(%rms_norm, [24], None, 1e-05)",
    ], added=[
        f"%rms_norm_default = qc.rms_norm.default(%x, %norm_weight, {eps})",
        "%rms_norm_default_1 = qc.rms_norm.default(%rms_norm_default, None, 1e-05)",
    ], exact=False)
    check_graph(after, "CHECK: aten.rms_norm.default({{%[0-9a-z_]+}}, [5, 24])")
    assert_outputs_close(before, after, [x], rtol=1e-5)
    assert FuseRmsNorm()(before).stats == {"aten-rms-norm": 2}


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 7, 24), (4100, 40), (2, 0, 8)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_native_rms_norm_is_the_written_out_formula_to_fp32_rounding(shape, with_weight):
    """y = γ · x / √(Σx²/d + ε) per row, sums in another order: within a few fp32 ulps."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g) * 3
    weight = torch.rand(shape[-1], generator=g) + 0.5 if with_weight else None
    expected = reference_rms_norm(x.double(), None if weight is None else weight.double(), 1e-6)
    actual = torch.ops.qc.rms_norm(x, weight, 1e-6)
    assert actual.shape == x.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=4e-7, atol=1e-7)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # not contiguous: read through a copy
    torch.testing.assert_close(torch.ops.qc.rms_norm(strided, weight, 1e-6), actual, rtol=0, atol=0)


def test_native_rms_norm_refuses_what_it_does_not_run_naming_the_operand():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="qc::rms_norm: x must be float32"):
        torch.ops.qc.rms_norm(x.bfloat16(), None, 1e-6)
    with pytest.raises(RuntimeError, match="qc::rms_norm: weight must be 8 contiguous float32 values"):
        torch.ops.qc.rms_norm(x, torch.ones(7), 1e-6)


def test_linear_bf16_on_its_prepacked_weight_gives_the_plain_bf16_linear_bit_for_bit():
    from qcompile.targets.cpu_features import has_bf16_gemm
    from qcompile.targets.cpu_int8.bf16_kernels import _PACKED, linear_bf16

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=g).bfloat16(), torch.randn(48, generator=g)
    inputs = [torch.randn(rows, 32, generator=g) for rows in (5, 1, 128)]
    inputs += [torch.randn(2, 7, 32, generator=g), torch.randn(32, 9, generator=g).t(), torch.randn(0, 32)]
    for x in inputs:  # the weight packed for 5 rows serves every other count, a 3-D input and a transposed view
        expected = torch.nn.functional.linear(x.bfloat16(), weight, bias.bfloat16()).float()
        assert torch.equal(linear_bf16(x, weight, bias), expected)
    assert torch.equal(linear_bf16(inputs[0], weight, None),
                       torch.nn.functional.linear(inputs[0].bfloat16(), weight).float())
    packed = [w for w in _PACKED.keys() if w is weight]
    assert len(packed) == (1 if has_bf16_gemm() else 0)  # packed once, where oneDNN multiplies bf16 natively
