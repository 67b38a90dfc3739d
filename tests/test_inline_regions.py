"""inline-regions (passes/inline_regions.py): no-grad and autocast-off blocks become the graph's own ops."""

import torch
from qcompile.passes import Canonicalize, InlineRegions

import qcompile
from qcompile.testing import assert_graph_diff, assert_outputs_close, assert_pass_contract, check_graph


class Rotary(torch.nn.Module):
    """transformers' rotary embedding: cos and sin under no_grad, in fp32 with autocast off."""

    def __init__(self, autocast_on: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
        self.autocast_on = autocast_on

    def forward(self, x, positions):
        with torch.no_grad():
            with torch.autocast("cpu", enabled=self.autocast_on):
                freqs = positions[:, :, None].float() @ self.inv_freq[None, :]  # a matmul, which autocast casts
                emb = torch.cat([freqs, freqs], -1)
                cos, sin = emb.cos(), emb.sin()
        return x * cos + x.flip(-1) * sin


def inputs():
    return torch.randn(2, 6, 8), torch.arange(6).repeat(2, 1)


def regions(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target.name() for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]


def test_a_no_grad_block_and_the_autocast_off_block_in_it_inline_into_the_graph():
    args = inputs()
    before = qcompile.capture(Rotary(), args)
    assert regions(before) == ["wrap_with_set_grad_enabled"]  # the autocast block sits inside
    after = assert_pass_contract(InlineRegions(), before, list(args))
    assert regions(after) == [] and not [name for name, _ in after.named_children() if name.startswith("submod")]
    assert_graph_diff(before, after, removed=[
        "constant submod_1", "wrap_with_set_grad_enabled",
        "%cos = operator.getitem(%wrap_with_set_grad_enabled, 0)",
        "%sin = operator.getitem(%wrap_with_set_grad_enabled, 1)",
        "%mul = aten.mul.Tensor(%x, %cos)", "%mul_1 = aten.mul.Tensor(%flip, %sin)",
    ], added=[
        "aten.slice.Tensor(%positions", "aten.slice.Tensor", "aten.unsqueeze.default", "aten.to.dtype",
        "%unsqueeze_1 = aten.unsqueeze.default(%inv_freq, 0) : f32[1,4]",
        "%matmul = aten.matmul.default(%to, %unsqueeze_1) : f32[s0,s1,4]",
        "%cat = aten.cat.default([%matmul, %matmul], -1) : f32[s0,s1,8]",
        "%cos_2 = aten.cos.default(%cat)", "%sin_2 = aten.sin.default(%cat)",
        "%mul = aten.mul.Tensor(%x, %cos_2)", "%mul_1 = aten.mul.Tensor(%flip, %sin_2)",
        "aten._assert_tensor_metadata.default(%unsqueeze",
    ])
    # the region's ops read the graph's values: canonicalize now sees (and drops) their no-op conversions
    check_graph(Canonicalize()(after).graph_module, """
    CHECK: aten.cos.default
    CHECK: aten.sin.default
    CHECK-NOT: _assert_tensor_metadata
    """)
    assert_outputs_close(before, after, list(args), rtol=0)
    assert InlineRegions()(before).stats == {"grad": 1, "autocast": 1}


def test_an_autocast_on_block_stays_a_region():
    """Inlined, its ops would run in fp32 instead of autocast's bf16: its values would change."""
    args = inputs()
    before = qcompile.capture(Rotary(autocast_on=True), args)
    after = InlineRegions()(before).graph_module
    assert regions(after) == ["wrap_with_autocast"]
    assert_outputs_close(before, after, list(args), rtol=0)


def test_compile_runs_the_inlined_ops_and_agrees_with_the_model():
    model, args = Rotary(), inputs()
    qm = qcompile.compile(model, args, calibration_data=[args], progress=False)
    assert regions(qm.graph_module) == []
    assert next(p for p in qm.report.passes if p.name == "inline-regions").stats == {"grad": 1, "autocast": 1}
    torch.testing.assert_close(qm(*args), model(*args), rtol=1e-6, atol=1e-6)
