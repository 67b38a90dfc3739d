"""lower-float-bf16 (passes/lower_float_bf16.py): attention and float linears to bf16 kernels, within bf16 rounding of fp32."""

import torch
from qcompile.targets.cpu_int8 import LowerFloatBf16

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


def test_attention_and_float_linear_lower_to_bf16():
    args = inputs()
    before = qcompile.capture(Attention(), args)
    after = assert_pass_contract(LowerFloatBf16(), before)
    check_graph(after, """
    CHECK: qc.attention_bf16.default(%0, %1, %2, %3, 0.1767766952{{[0-9]*}}, torch.float32) : f32[s0,s1,s2,32]
    CHECK: constant proj_weight_bf16 : bf16[32,32]
    CHECK: qc.linear_bf16.default
    """)
    assert_outputs_close(before, after, list(args), rtol=2e-2)
    assert torch.isfinite(after(*args)).all()  # fp32's lowest mask value must not become -inf rows


def test_causal_attention_stays_with_the_reason():
    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v, _ = inputs()
    result = LowerFloatBf16()(qcompile.capture(Causal(), (q, k, v)))
    assert result.of_kind("kept") == {"scaled_dot_product_attention": "attention stays fp32: causal masking"}


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        heads = [p(x).view(x.shape[0], -1, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v)]
        context = torch.nn.functional.scaled_dot_product_attention(*heads)
        return self.out(context.transpose(1, 2).reshape(x.shape[0], -1, 32))


def test_int8_linears_that_only_feed_the_bf16_attention_write_bf16():
    batches = [(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    qm = qcompile.compile(SelfAttention(), calibration_data=batches, progress=False, outlier_smoothing=None)
    # q, k and v run as one merged GEMM (merge-sibling-linears) whose slices feed the attention
    check_graph(qm.graph_module, """
    CHECK: qc.linear_int8.default({{.*}}, torch.bfloat16, 'none') : bf16[s0,s1,96]
    CHECK-NEXT: aten.slice.Tensor{{.*}} : bf16[s0,s1,32]
    CHECK: aten.reshape.default{{.*}} : bf16[s0,s1,4,8]
    CHECK-NEXT: aten.transpose.int{{.*}} : bf16[s0,4,s1,8]
    CHECK: qc.attention_bf16.default({{.*}}, torch.float32) : f32[s0,4,s1,8]
    """)
    kernels = [n for n in qm.graph_module.graph.nodes if n.target == torch.ops.qc.linear_int8.default]
    assert [n.args[9] for n in kernels] == [torch.bfloat16, torch.float32]  # the output projection stays
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(qm(x), SelfAttention()(x), rtol=0.05, atol=0.05)


class ValueAlsoReadElsewhere(SelfAttention):
    def forward(self, x):
        value = self.v(x)
        heads = [p(x).view(x.shape[0], -1, 4, 8).transpose(1, 2) for p in (self.q, self.k)]
        heads.append(value.view(x.shape[0], -1, 4, 8).transpose(1, 2))
        context = torch.nn.functional.scaled_dot_product_attention(*heads)
        return self.out(context.transpose(1, 2).reshape(x.shape[0], -1, 32)) + value


def test_an_int8_linear_with_a_use_outside_the_attention_keeps_its_float32_output():
    batches = [(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    qm = qcompile.compile(ValueAlsoReadElsewhere(), calibration_data=batches, progress=False,
                          outlier_smoothing=None)
    merged = next(n for n in qm.graph_module.graph.nodes
                  if n.target == torch.ops.qc.linear_int8.default and n.meta["val"].shape[-1] == 96)
    assert merged.args[9] == torch.float32  # the value slice also reaches the residual add
