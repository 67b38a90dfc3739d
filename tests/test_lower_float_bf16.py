"""lower-float-bf16: attention to the native fused kernel (fp32) and float linears to bf16, within their rounding of
fp32; fuse-rms-norm: a written-out RMSNorm to ATen's fused one."""

import torch
from qcompile.passes import Canonicalize
from qcompile.targets.cpu_int8 import FuseRmsNorm, LowerFloatBf16

import qcompile
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph


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
    # are the attention's operands: no copy between them
    check_graph(qm.graph_module, """
    CHECK: qc.linear_int8.default({{.*}}, torch.float32, 'none') : f32[s0,s1,96]
    CHECK-NEXT: aten.slice.Tensor{{.*}} : f32[s0,s1,32]
    CHECK: aten.transpose.int{{.*}} : f32[s0,4,s1,8]
    CHECK: qc.attention.default({{.*}}, False, torch.float32) : f32[s0,4,s1,8]
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


def test_a_written_out_rms_norm_becomes_atens_fused_one():
    x = torch.randn(2, 5, 24)
    before = canonical(RmsNormed(), x)
    after = assert_pass_contract(FuseRmsNorm(), before)
    check_graph(after, """
    CHECK: aten.rms_norm.default(%0, [24], {{%[0-9]+}}, 1e-06)
    CHECK: aten.rms_norm.default({{%[0-9]+}}, [24], {{%[0-9]+}}, 1e-05)
    CHECK-NOT: aten.rms_norm
    CHECK: aten.rsqrt
    """)
    assert_outputs_close(before, after, [x], rtol=1e-6)
    assert FuseRmsNorm()(before).stats == {"rms-norm": 1, "rms-norm-weight-last": 1}
