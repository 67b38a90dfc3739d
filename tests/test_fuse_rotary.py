"""fuse-rotary (qcompile/targets/cpu_int8/fuse_rotary.py) and the native qc.rotary it calls."""

import pytest
import torch
from qcompile.passes import Canonicalize
from qcompile.targets.cpu_int8 import FuseRotary
from qcompile.targets.cpu_int8.fuse_rotary import reference_rotary, rotate_half

import qcompile
from qcompile.testing import assert_graph_diff, assert_pass_contract


def heads(x):
    """[batch, positions, 3 · 8] as the projections' view leaves it: [batch, 3 heads, positions, 8]."""
    return x.view(x.shape[0], x.shape[1], 3, 8).transpose(1, 2)


class Rotated(torch.nn.Module):
    """transformers' apply_rotary_pos_emb on a query and a key, cos and sin [batch, positions, d]
    unsqueezed over the heads; the key's add and multiplies written the other way round."""

    def forward(self, q, k, cos, sin):
        q, k = heads(q), heads(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_embed = (q * cos) + (rotate_half(q) * sin)
        k_embed = (sin * rotate_half(k)) + (cos * k)
        return q_embed, k_embed


class NotRotary(torch.nn.Module):
    """Near misses: the halves swapped the other way, and a rotated value read twice."""

    def forward(self, q, cos, sin):
        q = heads(q)
        swapped = torch.cat([q[..., :4], -q[..., 4:]], dim=-1)
        turned = rotate_half(q)
        return q * cos + swapped * sin, q * cos + turned * sin + turned


def inputs(batch=2, positions=5):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, positions, 24, generator=g) for _ in range(2))
    cos, sin = torch.randn(batch, positions, 8, generator=g), torch.randn(batch, positions, 8, generator=g)
    return q, k, cos, sin


def test_the_query_and_key_rotations_become_one_native_call_each_bit_for_bit():
    args = inputs()
    before = Canonicalize()(qcompile.capture(Rotated(), args)).graph_module
    after = assert_pass_contract(FuseRotary(), before, list(args))
    assert FuseRotary()(before).stats == {"rotary": 2}
    assert_graph_diff(before, after, removed=[
        "%mul = aten.mul.Tensor(%transpose, %unsqueeze)",
        "%slice_1 = aten.slice.Tensor(%transpose, 3, 4, 9223372036854775807)", "%neg = aten.neg.default(%slice_1)",
        "%slice_2 = aten.slice.Tensor(%transpose, 3, 0, 4)", "%cat = aten.cat.default([%neg, %slice_2], -1)",
        "%mul_1 = aten.mul.Tensor(%cat, %unsqueeze_1)", "%add = aten.add.Tensor(%mul, %mul_1)",
        "%slice_3 = aten.slice.Tensor(%transpose_1, 3, 4, 9223372036854775807)", "%neg_1 = aten.neg.default(%slice_3)",
        "%slice_4 = aten.slice.Tensor(%transpose_1, 3, 0, 4)", "%cat_1 = aten.cat.default([%neg_1, %slice_4], -1)",
        "%mul_2 = aten.mul.Tensor(%unsqueeze_1, %cat_1)", "%mul_3 = aten.mul.Tensor(%unsqueeze, %transpose_1)",
        "%add_1 = aten.add.Tensor(%mul_2, %mul_3)", "return (%add, %add_1)",
    ], added=[
        "%rotary_default = qc.rotary.default(%transpose, %unsqueeze, %unsqueeze_1) : f32[s0,3,s1,8]",
        "%rotary_default_1 = qc.rotary.default(%transpose_1, %unsqueeze, %unsqueeze_1) : f32[s0,3,s1,8]",
        "return (%rotary_default, %rotary_default_1)",
    ])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(before(*args), after(*args), strict=True))


def test_near_misses_stay_written_out():
    q, _, cos, sin = inputs()
    cos, sin = cos[:, None], sin[:, None]
    before = Canonicalize()(qcompile.capture(NotRotary(), (q, cos, sin))).graph_module
    result = FuseRotary()(before)
    assert not result.modified and result.stats == {}


@pytest.mark.parametrize("shape", [(1, 14, 1, 64), (2, 3, 7, 8), (4, 2)])
def test_native_rotary_is_the_written_out_form_bit_for_bit_on_any_layout(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    cos, sin = torch.randn(shape[-2:], generator=g), torch.randn(shape[-2:], generator=g)  # broadcast over the rest
    expected = reference_rotary(x, cos, sin)
    assert torch.equal(torch.ops.qc.rotary(x, cos, sin), expected)
    if x.dim() == 4:
        strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # the heads' view of [b, t, h, d]
        assert torch.equal(torch.ops.qc.rotary(strided, cos, sin), expected)
        columns = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # a last dimension that is not dense
        assert torch.equal(torch.ops.qc.rotary(columns, cos.t().contiguous().t(), sin), expected)


def test_native_rotary_refuses_what_it_does_not_run_naming_the_operand():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="qc::rotary: x must be float32"):
        torch.ops.qc.rotary(x.double(), x, x)
    with pytest.raises(RuntimeError, match="qc::rotary: x's last dimension must be even, got 7"):
        torch.ops.qc.rotary(torch.randn(2, 7), torch.randn(7), torch.randn(7))
    with pytest.raises(RuntimeError, match="qc::rotary: cos and sin must be float32 with x's last dimension 8"):
        torch.ops.qc.rotary(x, torch.randn(2, 4), x)
