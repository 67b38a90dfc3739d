"""merge-sibling-linears (passes/merge_sibling_linears.py): linears reading one value become one GEMM and its slices."""

import torch
from qcompile.targets.cpu_int8 import MergeSiblingLinears

import qcompile
from qcompile.qconfig import TOKEN_ACTIVATION
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinySelfAttention
from tests.quant_stages import qdq

LINEAR = torch.ops.aten.linear.default


def _linears(gm):
    return [n for n in gm.graph.nodes if n.target == LINEAR]


def test_query_key_value_projections_become_one_gemm_and_three_slices():
    x = torch.randn(2, 8, 32)
    before = qdq(TinySelfAttention(), x)
    result = MergeSiblingLinears()(before)
    assert result.stats == {"merged": {"linear_default": ["linear", "linear_1", "linear_2"]}}
    after = assert_pass_contract(MergeSiblingLinears(), before, [x])
    check_graph(after, """
    CHECK: %4 = qc.dequantize.default(%3, %1, %2, None, torch.float32) : f32[s0,s1,32]
    CHECK-NEXT: %5 = constant linear_merged_weight : i8[96,32]
    CHECK-NEXT: %6 = constant linear_merged_weight_scale : f32[96]
    CHECK-NEXT: %7 = constant linear_merged_weight_zero_point : i32[96]
    CHECK-NEXT: %8 = qc.dequantize.default(%5, %6, %7, 0, torch.float32) : f32[96,32]
    CHECK-NEXT: %9 = constant linear_merged_bias : i32[96]
    CHECK: %12 = qc.dequantize.default(%9, %10, %11, 0, torch.float32) : f32[96]
    CHECK-NEXT: %13 = aten.linear.default(%4, %8, %12) : f32[s0,s1,96]
    CHECK-NEXT: %14 = aten.slice.Tensor(%13, 2, 0, 32) : f32[s0,s1,32]
    CHECK: aten.slice.Tensor(%13, 2, 32, 64) : f32[s0,s1,32]
    CHECK: aten.slice.Tensor(%13, 2, 64, 96) : f32[s0,s1,32]
    CHECK: aten.scaled_dot_product_attention.default
    """)
    # the output projection reads another value; it keeps its own GEMM
    assert len(_linears(before)) == 4 and len(_linears(after)) == 2
    # every output channel keeps its own integers, scale and bias: the same values, to float rounding
    assert_outputs_close(before, after, [x], rtol=1e-6)


def test_per_tensor_and_per_channel_weights_stack_into_per_channel_rows():
    x = torch.randn(2, 8, 32)
    before = qdq(TinySelfAttention(), x)
    # make the key's weight per-tensor: one scale repeated over its rows must still stack
    key_weight = next(n.args[1] for n in _linears(before) if n.name == "linear_1")
    values, scale, zero_point = (qcompile.constant_value(before, a) for a in key_weight.args[:3])
    one_scale = scale.max().reshape(1)
    requantized = torch.clamp(torch.round(values.float() * scale[:, None] / one_scale), -127, 127).to(torch.int8)
    setattr(before, key_weight.args[0].target, requantized)
    setattr(before, key_weight.args[1].target, one_scale)
    setattr(before, key_weight.args[2].target, zero_point[:1].clone())
    key_weight.update_arg(3, None)
    before.recompile()
    after = MergeSiblingLinears()(before).graph_module
    merged_scale = next(qcompile.constant_value(after, n) for n in after.graph.nodes
                        if n.op == "get_attr" and n.target == "linear_merged_weight_scale")
    assert torch.equal(merged_scale[32:64], one_scale.expand(32))
    assert_outputs_close(before, after, [x], rtol=1e-6)


class FusedAndPlainSiblings(torch.nn.Module):
    """Four linears reading x: one ends in a GELU, one in a residual add, two are plain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.skip, self.left, self.right = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return torch.nn.functional.gelu(self.up(x)) + (self.skip(x) + x) * self.left(x) - self.right(x)


def test_a_sibling_with_an_epilogue_keeps_its_own_kernel():
    x = torch.randn(4, 16)
    before = qdq(FusedAndPlainSiblings(), x)
    result = MergeSiblingLinears()(before)
    assert result.stats == {"merged": {"linear_default": ["linear_2", "linear_3"]}}
    kept = {n.name for n in _linears(result.graph_module)}
    assert {"linear", "linear_1"} <= kept  # the GELU's and the residual add's linears
    assert_outputs_close(before, result.graph_module, [x], rtol=1e-6)


def test_nothing_to_merge_is_reported_unchanged():
    x = torch.randn(2, 8, 32)
    once = MergeSiblingLinears()(qdq(TinySelfAttention(), x)).graph_module
    again = MergeSiblingLinears()(once)
    assert not again.modified and again.stats == {}


def test_the_report_names_each_projection_with_the_merged_kernel_it_runs_in():
    x = torch.randn(2, 8, 32)
    model = TinySelfAttention()
    qm = qcompile.compile(model, (x,), target="cpu-int8", calibration_data=[(torch.randn(2, 8, 32),)] * 2,
                          progress=False)
    details = {n.name: (n.precision, n.detail) for n in qm.report.nodes}
    for projection in ("linear", "linear_1", "linear_2"):
        assert details[projection] == ("int8", "qc.linear_int8 -> float32 (a slice of one merged GEMM)")
    assert details["linear_3"][0] == "int8"
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.99


def test_float_siblings_kept_out_of_int8_merge_into_one_bf16_linear(bf16_gemm):
    x = torch.randn(2, 8, 32)
    model = TinySelfAttention()
    qconfig = qcompile.int8_preset().set_module_regex("query|key|value", None)
    qm = qcompile.compile(model, (x,), target="cpu-int8", calibration_data=[(torch.randn(2, 8, 32),)] * 2,
                          qconfig=qconfig, progress=False)
    merge = next(p for p in qm.report.passes if p.name == "merge-sibling-linears")
    assert merge.stats == {"merged": {"linear_default": ["linear", "linear_1", "linear_2"]}}
    kernels = [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.qc.linear_bf16.default, torch.ops.qc.linear_int8.default)]
    assert kernels == [torch.ops.qc.linear_bf16.default, torch.ops.qc.linear_int8.default]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.99


W4A8 = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(
    TOKEN_ACTIVATION, qcompile.QuantSpec("int4", granularity=qcompile.PerGroup(1, 32)))})


def test_int4_groups_stack_row_by_row_and_the_projections_run_as_one_w4a8_call():
    x = torch.randn(2, 8, 64)
    model = TinySelfAttention(width=64)
    qm = qcompile.compile(model, (x,), calibration_data=[(torch.randn(2, 8, 64),)] * 2, qconfig=W4A8, progress=False)
    before = qm.qdq_graph_module
    assert MergeSiblingLinears()(before).stats == {"merged": {"linear_default": ["linear", "linear_1", "linear_2"]}}
    after = assert_pass_contract(MergeSiblingLinears(), before, [x])
    check_graph(after, """
    CHECK: constant linear_merged_weight : i8[192,2,32]
    CHECK-NEXT: constant linear_merged_weight_scale : f32[192,2,1]
    CHECK-NEXT: constant linear_merged_weight_zero_point : i32[192,2,1]
    CHECK-NEXT: qc.dequantize.default({{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, None, torch.float32) : f32[192,2,32]
    CHECK-NEXT: aten.view.default({{%[0-9]+}}, [192, 64]) : f32[192,64]
    CHECK-NEXT: constant linear_merged_bias : f32[192]
    CHECK-NEXT: aten.linear.default({{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}) : f32[s0,s1,192]
    """)
    assert_outputs_close(before, after, [x], rtol=1e-6)  # each row keeps its own groups' integers and scales
    calls = [n for n in qm.graph_module.graph.nodes if n.target == torch.ops.qc.linear_w4a8.default]
    assert len(calls) == 2  # the merged projections and the output projection
    details = {n.name: n.detail for n in qm.report.nodes}
    assert all("a slice of one merged GEMM" in details[p] for p in ("linear", "linear_1", "linear_2"))
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.99
