"""annotate (passes/annotate.py): the plan per node, shared qparams through shape ops, reasons for float."""

import dataclasses
import warnings

import pytest
import torch
from qcompile.passes import Annotate, InsertObservers

import qcompile
from qcompile.ir.meta import get_qspec
from qcompile.targets.cpu_int8.capabilities import KERNEL_WEIGHT_DTYPE
from qcompile.testing import assert_pass_contract, check_graph
from tests.models import TinyBlock, TinyConvNet, TinyTokenEncoder
from tests.quant_stages import cleaned


def test_linears_get_activation_weight_and_derived_bias_specs():
    x = torch.randn(4, 16)
    out = assert_pass_contract(Annotate(), cleaned(TinyBlock(), x), [x])
    # int7 on a CPU without VNNI (test_a_weight_wider_than_the_kernel_multiplies_exactly_is_planned_narrowed)
    check_graph(out, """
    CHECK: aten.linear.default{{.*}}qc.qspec=[0=activation:uint8/affine/per-tensor/minmax@x, 1=weight:WEIGHT/sym/per-channel(0)/minmax, 2=bias:int32/sym/per-channel(0)/minmax]
    CHECK: aten.gelu.default
    CHECK: aten.linear.default{{.*}}0=activation:uint8/affine/per-tensor/minmax@gelu,
    CHECK-NOT: qc.qspec
    """.replace("WEIGHT", KERNEL_WEIGHT_DTYPE))


def test_activation_is_observed_above_shape_ops_that_share_qparams():
    x = torch.randn(2, 1, 8, 8)
    out = Annotate()(cleaned(TinyConvNet(), x)).graph_module
    check_graph(out, """
    CHECK: aten.max_pool2d.default{{.*}}qc.qspec=shares(relu)
    CHECK: aten.conv2d.default{{.*}}0=activation:{{[^@]*}}@relu,
    CHECK: aten.flatten.using_ints{{.*}}qc.qspec=shares(relu_1)
    CHECK: aten.linear.default{{.*}}0=activation:{{[^@]*}}@relu_1,
    """)


def test_qconfig_none_and_unsupported_specs_stay_float_with_the_reason():
    x = torch.randn(4, 16)
    affine = qcompile.OpQuantConfig(qcompile.int8_preset().by_op["linear"].activation,
                                    qcompile.QuantSpec("int8", symmetric=False, granularity=qcompile.PerChannel(0)))
    qconfig = (qcompile.int8_preset().set_module_name("down", None).set_module_name("up", affine)
               .set_op("layer_norm", qcompile.int8_preset().by_op["linear"]))
    result = Annotate(qconfig=qconfig)(cleaned(TinyBlock(), x))
    plans = {n.name: qcompile.get_qspec(n) for n in result.graph_module.graph.nodes if qcompile.get_qspec(n)}
    assert plans["linear_1"].float_reason == "the QConfig keeps it float (module name 'down')"
    assert plans["linear"].float_reason == "affine weights (kernel takes symmetric weights, zero point 0; affine only in groups)"
    assert plans["layer_norm"].float_reason == "cpu-int8 has no int8 kernel for 'layer_norm'"
    assert result.stats["quantized"] == 0
    assert set(result.of_kind("unsupported")) == {"linear", "layer_norm"}
    assert {d.kind for d in result.diagnostics} == {"unsupported"}


def no_vnni_target() -> qcompile.Target:
    """cpu-int8 as it is planned on a CPU without VNNI (u8s8 products added in saturating int16
    pairs), whatever CPU the test runs on."""
    cpu = qcompile.get_target("cpu-int8")
    rules = {kind: dataclasses.replace(rule, weight_bits=7, narrowing_reason="int16 pairs saturate")
             if kind in ("linear", "conv2d") else rule for kind, rule in cpu.op_rules.items()}
    return qcompile.register_target(dataclasses.replace(cpu, name="test-cpu-int8-no-vnni", op_rules=rules))


def test_a_weight_wider_than_the_kernel_multiplies_exactly_is_planned_narrowed():
    x = torch.randn(4, 16)
    preset = qcompile.int8_preset()
    # "down" weight-only: no u8s8 GEMM, so its int8 weight stays int8; an int4 weight is narrow enough.
    qconfig = (preset.set_module_name("down", qcompile.OpQuantConfig(None, preset.by_op["linear"].weight))
               .set_module_name("up", qcompile.OpQuantConfig(preset.by_op["linear"].activation,
                                                             qcompile.QuantSpec("int4", granularity=qcompile.PerChannel(0)))))
    target = no_vnni_target()
    result = Annotate(target=target.name, qconfig=qconfig)(cleaned(TinyBlock(), x))
    assert result.of_kind("narrowed") == {}
    result = Annotate(target=target.name)(cleaned(TinyBlock(), x))
    check_graph(result.graph_module, """
    CHECK: aten.linear.default{{.*}}1=weight:int7/sym/per-channel(0)/minmax, 2=bias:int32
    CHECK: aten.linear.default{{.*}}1=weight:int7/sym/per-channel(0)/minmax, 2=bias:int32
    """)
    assert result.of_kind("narrowed") == {"linear": "int16 pairs saturate", "linear_1": "int16 pairs saturate"}
    # The compiled model runs the narrowed plan on the int8 kernels and says why in its report.
    qm = qcompile.compile(TinyBlock(), target=target.name, calibration_data=[torch.randn(4, 16) for _ in range(4)])
    assert "2 weight(s) narrowed (linear, linear_1): int16 pairs saturate" in qm.report.notes
    assert {n.precision for n in qm.report.nodes} == {"int8"}
    weights = [edge["dtype"] for entry in qm.report.plan for edge in entry.get("inputs", []) if edge["role"] == "weight"]
    assert weights == ["int7", "int7"]


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(qcompile.QCompileError, match="unknown target 'gpu-int3'; known targets: cpu-fp8, cpu-int8"):
        Annotate(target="gpu-int3")(cleaned(TinyBlock(), torch.randn(2, 16)))


def test_onnx_qdq_quantizes_adds_that_join_convolutions_only(resnet):
    x = torch.randn(2, 3, 32, 32)
    out = Annotate(target="onnx-qdq")(cleaned(resnet, x)).graph_module
    check_graph(out, """
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[0=activation:{{[^@]*}}@conv2d_2, 1=activation:{{[^@]*}}@max_pool2d]
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[0=activation:{{[^@]*}}@conv2d_4, 1=activation:{{[^@]*}}@relu_2]
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[0=activation:{{[^@]*}}@conv2d_7, 1=activation:{{[^@]*}}@conv2d_5]
    """)


def test_cpu_int8_residual_add_quantizes_only_the_input_the_convolution_does_not_compute(resnet):
    # The add is the sum post-op of the convolution before it: that input stays float inside
    # the kernel. In a downsampling block both inputs are convolutions; the first is fused and
    # the shortcut's convolution feeds the sum as uint8.
    x = torch.randn(2, 3, 32, 32)
    result = Annotate()(cleaned(resnet, x))
    check_graph(result.graph_module, """
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[1=activation:{{[^@]*}}@max_pool2d]
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[1=activation:{{[^@]*}}@relu_2]
    CHECK: aten.add.Tensor{{.*}}qc.qspec=[1=activation:{{[^@]*}}@conv2d_5]
    """)
    assert not result.of_kind("unsupported")


def test_cpu_int8_add_without_a_quantized_convolution_to_fuse_into_stays_float_with_the_reason(resnet):
    x = torch.randn(2, 3, 32, 32)
    qconfig = qcompile.int8_preset().set_module_name("layer1.0.conv2", None)
    plans = {n.name: qcompile.get_qspec(n)
             for n in Annotate(qconfig=qconfig)(cleaned(resnet, x)).graph_module.graph.nodes}
    assert plans["add"].float_reason == (
        "no cpu-int8 kernel runs 'add' alone: it is quantized in the epilogue of a quantized conv2d "
        "whose only user it is, and none feeds it")
    assert plans["add_1"].quantized


def test_onnx_qdq_leaves_a_residual_add_on_a_float_path_float_without_warning():
    x = torch.randn(4, 16)
    result = Annotate(target="onnx-qdq")(cleaned(TinyBlock(), x))
    add = next(n for n in result.graph_module.graph.nodes if n.name == "add")
    assert qcompile.get_qspec(add) is None
    assert not result.of_kind("unsupported")


def test_a_vocabulary_table_gets_int8_rows_and_a_table_read_at_constant_indices_stays_float():
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate float choice is no warning
        out = assert_pass_contract(Annotate(), cleaned(TinyTokenEncoder(), ids), [ids])
    check_graph(out, """
    CHECK: %2 = aten.embedding.default(%1, %0){{.*}}qc.qspec=[0=weight:int8/sym/per-channel(0)/minmax]}
    CHECK: %7 = aten.embedding.default(%3, %6){{.*}}qc.qspec=float(looked up at constant indices
    """)


class SiluAndReluHeads(torch.nn.Module):
    """conv -> SiLU (float), conv -> ReLU -> mean (float), conv -> conv (int8 throughout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = torch.nn.functional.silu(self.a(x))
        return torch.relu(self.c(self.b(h))).mean((2, 3))


def test_onnx_qdq_quantizes_a_convolution_output_read_in_float_after_its_relu():
    x = torch.randn(2, 3, 8, 8)
    out = assert_pass_contract(Annotate(target="onnx-qdq"), cleaned(SiluAndReluHeads(), x), [x])
    plans = {n.name: get_qspec(n) for n in out.graph.nodes if get_qspec(n) is not None}
    outputs = {name: plan.output and plan.output.observe_at for name, plan in plans.items()}
    # SiLU reads a's output float; c's ReLU output goes to a float mean; b feeds c, already quantized
    assert outputs == {"conv2d": "conv2d", "conv2d_1": None, "conv2d_2": "relu"}
    assert str(plans["conv2d"]).endswith("out=activation:uint8/affine/per-tensor/minmax@conv2d]")
    # cpu-int8's kernels write float: no output edge there
    assert all(get_qspec(n) is None or get_qspec(n).output is None
               for n in Annotate()(cleaned(SiluAndReluHeads(), x)).graph_module.graph.nodes)
    observed = InsertObservers()(out).graph_module
    check_graph(observed, """
    CHECK: %4 = aten.conv2d.default
    CHECK-NEXT: module[observer_0](%4)
    CHECK-NEXT: aten.silu.default
    CHECK: %15 = aten.relu.default
    CHECK-NEXT: module[observer_3](%15)
    CHECK-NEXT: aten.mean.dim(%16
    """)
