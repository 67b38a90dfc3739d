"""Targets registered from outside the package: an FP8 reference target through convert."""

import dataclasses

import torch

import qcompile
from qcompile.spec import PerChannel, PerTensor, QuantSpec
from tests.models import TinyBlock

E4M3_ACTIVATION = QuantSpec(dtype="float8_e4m3fn", symmetric=True, granularity=PerTensor())
E4M3_WEIGHT = QuantSpec(dtype="float8_e4m3fn", symmetric=True, granularity=PerChannel(0))


def fp8_reference_target() -> qcompile.Target:
    config = qcompile.OpQuantConfig(E4M3_ACTIVATION, E4M3_WEIGHT)
    cpu = qcompile.get_target("cpu-int8")
    return qcompile.register_target(dataclasses.replace(
        cpu, name="test-fp8-reference", description="FP8 E4M3 weights and activations as a reference Q/DQ graph",
        op_rules={"linear": qcompile.OpRule(activation_dtypes=("float8_e4m3fn",), weight_dtypes=("float8_e4m3fn",))},
        preset=lambda: qcompile.QConfig(by_op={"linear": config}), lower="eliminate-dead-code",
        unlowered="FP8 reference Q/DQ"))


def test_an_fp8_spec_gets_through_convert_and_runs_as_a_reference_qdq_graph():
    model = TinyBlock()
    data = [(torch.randn(4, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    qm = qcompile.compile(model, calibration_data=data, target=fp8_reference_target(), progress=False,
                          outlier_smoothing=None)
    quantizes = [n for n in qm.qdq_graph_module.graph.nodes if n.target == torch.ops.qc.quantize.default]
    assert {n.meta["val"].dtype for n in quantizes} == {torch.float8_e4m3fn}
    weights = [t for _, t in qm.qdq_graph_module.named_buffers() if t.dtype == torch.float8_e4m3fn]
    assert len(weights) == 2  # both linears' weights stored in float8
    x = data[0][0]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0)
    assert cosine > 0.999  # E4M3 keeps 3 mantissa bits: about int8's error on this block
    assert [n.precision for n in qm.report.nodes] == ["fp8-ref", "fp8-ref"]


def test_fp8_quantize_saturates_and_rounds_to_the_nearest_e4m3_value():
    x = torch.tensor([0.0, 1.0, 1.06, 1.07, 500.0, -1e6])
    q = torch.ops.qc.quantize(x, torch.tensor([1.0]), torch.tensor([0]), None, -448, 448, torch.float8_e4m3fn)
    # E4M3 steps by 1/8 between 1 and 2: 1.06 rounds down to 1.0, 1.07 up to 1.125; beyond 448 saturates.
    assert q.float().tolist() == [0.0, 1.0, 1.0, 1.125, 448.0, -448.0]
    assert (E4M3_ACTIVATION.qmin, E4M3_ACTIVATION.qmax) == (-448, 448)


# A kernel-backed target, all of it outside the package: a kernel with its contract, a lowering
# pass, and a target that names them. Nothing in qcompile knows of any of it.

@torch.library.custom_op("qctest::int_matmul_linear", mutates_args=())
def int_matmul_linear(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight: torch.Tensor,
                      weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """uint8 x int8 in int32 arithmetic, scaled once: (x - Z_x)·Wᵀ · S_x·S_w + b."""
    accumulated = (x.to(torch.int32) - x_zero_point.to(torch.int32)) @ weight.to(torch.int32).T
    y = accumulated.float() * (x_scale.float() * weight_scale.float().reshape(-1))
    return y if bias is None else y + bias


@int_matmul_linear.register_fake
def _(x, x_scale, x_zero_point, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def reference_int_matmul_linear(x, x_scale, x_zero_point, weight, weight_scale, bias):
    dequantized = torch.ops.qc.dequantize(x, x_scale, x_zero_point, None, torch.float32)
    w = torch.ops.qc.dequantize(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0,
                                torch.float32)
    return torch.nn.functional.linear(dequantized, w, bias)


qcompile.register_kernel(int_matmul_linear, reference_int_matmul_linear)


@dataclasses.dataclass(frozen=True)
class LowerIntMatmul(qcompile.Pass):
    """dequantize(x_q) -> linear(·, dequantize(W_q), b) -> qctest.int_matmul_linear(x_q, ..., W_q, ..., b)"""

    name = "test-lower-int-matmul"
    requires = frozenset({"qdq"})
    establishes = frozenset({"lowered"})

    def call(self, gm):
        from qcompile.qdq import DequantizeCall

        lowered = 0
        for node in list(gm.graph.nodes):
            if node.target != torch.ops.aten.linear.default:
                continue
            arguments = qcompile.op_arguments(node)
            x, w = DequantizeCall.of(arguments["input"]), DequantizeCall.of(arguments["weight"])
            if x is None or w is None or x.axis is not None:
                continue
            kernel = qcompile.insert_call(
                gm, torch.ops.qctest.int_matmul_linear.default,
                (x.q, x.scale, x.zero_point, w.q, w.scale, arguments["bias"]), before=node,
                provenance=qcompile.Provenance(self.name, "linear", (node.name,)), meta_from=node)
            node.replace_all_uses_with(kernel)
            gm.graph.erase_node(node)
            lowered += 1
        return qcompile.PassResult(gm, bool(lowered), {"lowered": lowered} if lowered else {})


def test_a_target_registered_from_outside_lowers_to_its_own_kernel_and_is_checked_against_it():
    cpu = qcompile.get_target("cpu-int8")
    target = qcompile.register_target(dataclasses.replace(
        cpu, name="test-int-matmul", description="int32 matmul reference kernel",
        op_rules={"linear": cpu.op_rules["linear"]}, lower="test-lower-int-matmul,eliminate-dead-code",
        passes=(LowerIntMatmul,),
        preset=lambda: qcompile.QConfig(by_op={"linear": qcompile.int8_preset().by_op["linear"]}),
        describe_kernel=lambda node: "qctest.int_matmul_linear"
        if node.target == torch.ops.qctest.int_matmul_linear.default else None))
    model = TinyBlock()
    data = [(torch.randn(4, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    qm = qcompile.compile(model, calibration_data=data, target="test-int-matmul", progress=False)
    assert target.name == qm.report.target
    assert [(n.precision, n.detail) for n in qm.report.nodes] == [("int8", "qctest.int_matmul_linear")] * 2
    assert qm.report.kernel_calls_checked == 2  # held to its registered reference at compile time
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qm.qdq_graph_module(x), rtol=1e-4, atol=1e-4)
