"""normalize-linears on literal IR: products with a constant weight become linear, exactly."""

import torch
from qcompile.passes.normalize_linears import NormalizeLinears

from qcompile.ir.parser import parse_graph
from qcompile.testing import assert_rewrites


def test_addmm_with_a_constant_weight_becomes_linear_with_the_weight_transposed():
    out = assert_rewrites(NormalizeLinears(), """
        %x = input x : f32[6,8]
        %b = constant attn.bias : f32[12]
        %w = constant attn.weight : f32[8,12]
        %y = aten.addmm.default(%b, %x, %w) : f32[6,12]
        return (%y,)
    """, """
        %x = input x : f32[6,8]
        %y_weight = constant y_weight : f32[12,8]
        %b = constant attn.bias : f32[12]
        %linear_default = aten.linear.default(%x, %y_weight, %b) : f32[6,12]
        %w = constant attn.weight : f32[8,12]
        return (%linear_default,)
    """)
    assert torch.equal(out.y_weight, out.attn.weight.t())  # the model's tensor is left as it was


def test_matmul_with_a_constant_becomes_linear_and_a_product_of_activations_stays():
    assert_rewrites(NormalizeLinears(), """
        %x = input x : f32[2,5,8]
        %w = constant proj : f32[8,4]
        %y = aten.matmul.default(%x, %w) : f32[2,5,4]
        %k = input k : f32[2,4,5]
        %s = aten.matmul.default(%y, %k) : f32[2,5,5]
        return (%s,)
    """, """
        %x = input x : f32[2,5,8]
        %k = input k : f32[2,4,5]
        %y_weight = constant y_weight : f32[4,8]
        %linear_default = aten.linear.default(%x, %y_weight, None) : f32[2,5,4]
        %s = aten.matmul.default(%linear_default, %k) : f32[2,5,5]
        %w = constant proj : f32[8,4]
        return (%s,)
    """)


def test_a_scaled_addmm_is_left_as_it_is():
    gm = parse_graph("""
        %x = input x : f32[6,8]
        %b = constant bias : f32[12]
        %w = constant weight : f32[8,12]
        %y = aten.addmm.default(%b, %x, %w, beta=0.5) : f32[6,12]
        return (%y,)
    """)
    assert not NormalizeLinears()(gm).modified
