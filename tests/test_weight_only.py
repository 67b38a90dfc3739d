"""Weight-only linears on cpu-int8: int8 per channel and int4 per group on bf16 activations
(qc.linear_weight_only), the grouped Q/DQ form, the kernel dispatch and its refusals."""

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qcompile
from qcompile import OpQuantConfig, PerChannel, PerGroup, QConfig, QuantSpec, native
from qcompile.ir.graph import constant_expression
from qcompile.ir.meta import get_qspec, set_qspec
from qcompile.kernel_check import kernel_contracts
from qcompile.qconfig import TOKEN_ACTIVATION
from qcompile.passes import Annotate, Convert
from qcompile.targets import cpu_features
from qcompile.targets.cpu_int8 import LowerWeightOnly
from qcompile.targets.onnx_qdq import matmul_nbits
from qcompile.targets.cpu_int8.weight_only_kernels import (
    WEIGHT_ONLY_KERNELS,
    WeightOnlyKernel,
    dequantized_weight,
    linear_weight_only,
    linear_weight_only_bound,
    reference_linear_weight_only,
)
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import SentenceEmbedder, TinyBlock, TinyConvNet, docstring_sentences, minilm_inputs
from tests.quant_stages import annotated, calibrated, cleaned

INT4_G32 = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int4", granularity=PerGroup(1, 32)))})
INT4_G16 = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int4", granularity=PerGroup(1, 16)))})
INT8_WO = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int8", granularity=PerChannel(0)))})


def int4_groups(out_features=48, in_features=64, size=32, seed=0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    grouped = weight.reshape(out_features, -1, size)
    scale = grouped.abs().amax(-1, keepdim=True) / 7
    return torch.round(grouped / scale).clamp(-8, 7).to(torch.int8), scale


@pytest.mark.parametrize("rows", [5, 40])  # the GEMV kernels, and dequantize + bf16 GEMM from GEMV_ROWS on
@pytest.mark.parametrize("kernel", ["int8pack", "int4pack"])
def test_the_kernels_keep_their_contract(kernel, rows):
    x = torch.randn(3, rows, 64, generator=torch.Generator().manual_seed(1))
    if kernel == "int4pack":
        weight_q, scale = int4_groups()
        group = 32
    else:
        weight = torch.randn(48, 64)
        scale = weight.abs().amax(1) / 127
        weight_q, group = torch.round(weight / scale[:, None]).to(torch.int8), 0
    bias = torch.randn(48)
    y = linear_weight_only(x, weight_q, scale, None, group, bias, kernel)
    expected = reference_linear_weight_only(x, weight_q, scale, None, group, bias, kernel)
    assert y.shape == (3, rows, 48) and y.dtype == torch.float32
    assert float((y - expected).abs().max() / expected.abs().max()) < 2.0**-7
    assert kernel_contracts()[torch.ops.qc.linear_weight_only.default].precision == torch.bfloat16


@pytest.mark.parametrize("rows", [5, 40])
def test_affine_groups_keep_the_contract_through_int4packs_offsets(rows):
    # Σx·S·(q − Z) = S·Σx·(136 + q) − S·(136 + Z)·Σx: a group's zero point rides in the kernel's offsets
    weight_q, scale, zero_point = affine_int4_groups(48, 64, 32, seed=2)
    weight = torch.rand(48, 64, generator=torch.Generator().manual_seed(2)) * 3 - 0.5
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(3))
    y = linear_weight_only(x, weight_q, scale, zero_point, 32, None, "int4pack")
    expected = reference_linear_weight_only(x, weight_q, scale, zero_point, 32, None, "int4pack")
    torch.testing.assert_close(dequantized_weight(weight_q, scale, zero_point), weight, atol=float(scale.max()), rtol=0)
    error = float((y - expected).abs().max())
    assert error <= linear_weight_only_bound(x, weight_q, scale, zero_point, 32, None, "int4pack")
    # bf16 arithmetic, not the fp32 reference; except many rows without AVX512-BF16: an fp32 GEMM
    assert error > 0 or (rows >= native.GEMV_ROWS and not native.has_avx512_bf16())


ISAS = native.available_isas()


def affine_int4_groups(out_features, in_features, size, seed):
    """Weights with ranges far from symmetric, quantized per group with zero points."""
    weight = torch.rand(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 3 - 0.5
    grouped = weight.reshape(out_features, -1, size)
    lo, hi = grouped.amin(-1, keepdim=True).clamp(max=0), grouped.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    zero_point = (-8 - torch.round(lo / scale)).clamp(-8, 7).to(torch.int32)
    return (torch.round(grouped / scale) + zero_point).clamp(-8, 7).to(torch.int8), scale, zero_point


# avx512 (with AVX512-BF16): the int4 kernel and the blocked bf16 GEMM; portable: ATen's int4pack
# for fewer than GEMV_ROWS rows, the blocked dequantize + fp32 GEMM for more
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "outputs", "inputs", "group", "affine"), [
    (1, 48, 256, 128, False),   # a decode step: one row, whole 64-weight chunks
    (2, 13, 96, 32, True),      # a row pair, outputs not a multiple of the 4-output tile, a half chunk left over
    (3, 5, 512, 256, False),    # a pair and a single row
    (31, 70, 192, 64, True),    # the last row count before the GEMM path
    (40, 13, 96, 32, True),     # the GEMM path: one block of dequantized rows
    (33, 1100, 2048, 128, True),  # blocks of 4 MB of dequantized rows through the GEMM
    (1, 4100, 64, 32, True),    # packed 4096 rows at a time: two blocks, the last one ragged
])
def test_the_int4_kernel_keeps_its_contract_at_every_shape(isa, rows, outputs, inputs, group, affine):
    if affine:
        weight_q, scale, zero_point = affine_int4_groups(outputs, inputs, group, seed=rows)
    else:
        weight_q, scale = int4_groups(outputs, inputs, group, seed=rows)
        zero_point = None
    x, bias = torch.randn(rows, inputs), torch.randn(outputs)
    with native.running_on(isa):
        y = linear_weight_only(x, weight_q, scale, zero_point, group, bias, "int4pack")
    expected = reference_linear_weight_only(x, weight_q, scale, zero_point, group, bias, "int4pack")
    error = float((y - expected).abs().max())
    assert error <= linear_weight_only_bound(x, weight_q, scale, zero_point, group, bias, "int4pack")
    if isa == "avx512" and native.has_avx512_bf16() and rows < native.GEMV_ROWS:
        # the few-row kernel's only rounding is x to bf16, plus fp32 sums of x·(136 + q) with 136·Σx cancelled afterwards:
        # a few fp32 ulps of 136·Σ|x|·S (weight_only.cpp), far inside the bf16 bound
        rounded = reference_linear_weight_only(x.bfloat16().float(), weight_q, scale, zero_point, group, bias,
                                               "int4pack")
        scales = dequantized_weight(torch.ones_like(weight_q), scale)
        assert float((y - rounded).abs().max()) <= 2.0**-20 * 136 * float((x.abs() @ scales.t()).max())


@pytest.mark.parametrize("isa", ISAS)
def test_the_int8_gemm_path_keeps_its_contract_over_blocks_and_a_ragged_row(isa):
    # 33 rows: the blocked dequantize + GEMM (bf16 or fp32); 2056 inputs: rows of 16 and a tail of 8;
    # blocks of 4 MB
    weight = torch.randn(1100, 2056, generator=torch.Generator().manual_seed(6))
    scale = weight.abs().amax(1) / 127
    weight_q = torch.round(weight / scale[:, None]).to(torch.int8)
    x, bias = torch.randn(33, 2056), torch.randn(1100)
    with native.running_on(isa):
        y = linear_weight_only(x, weight_q, scale, None, 0, bias, "int8pack")
    expected = reference_linear_weight_only(x, weight_q, scale, None, 0, bias, "int8pack")
    assert float((y - expected).abs().max()) <= linear_weight_only_bound(x, weight_q, scale, None, 0, bias, "int8pack")


def test_an_int4_weight_is_packed_once_and_again_after_an_in_place_write():
    weight_q, scale = int4_groups(16, 64, 32, seed=4)
    x = torch.randn(1, 64)
    before = native.packs_made()
    first = linear_weight_only(x, weight_q, scale, None, 32, None, "int4pack")
    torch.testing.assert_close(linear_weight_only(x, weight_q, scale, None, 32, None, "int4pack"), first)
    packs = native.packs_made() - before
    assert packs <= 1  # the second call read the cached pack (none where the CPU lacks AVX512-BF16)
    with torch.no_grad():
        weight_q.neg_().clamp_(-8, 7)  # a user's in-place write, and one to a scale: neither may read a stale pack
        scale.mul_(2)
    y = linear_weight_only(x, weight_q, scale, None, 32, None, "int4pack")
    assert native.packs_made() - before == 2 * packs
    error = float((y - reference_linear_weight_only(x, weight_q, scale, None, 32, None, "int4pack")).abs().max())
    assert error <= linear_weight_only_bound(x, weight_q, scale, None, 32, None, "int4pack")


def test_the_int4_kernel_refuses_operands_outside_its_contract():
    weight_q, scale = int4_groups(16, 64, 32)
    with pytest.raises(ValueError, match=r"int4pack takes weights \[out, in / 32, 32\]"):
        linear_weight_only(torch.randn(1, 64), weight_q.reshape(16, 64), scale, None, 32, None, "int4pack")
    with pytest.raises(ValueError, match=r"x has 48 features, the weight 64"):
        linear_weight_only(torch.randn(1, 48), weight_q, scale, None, 32, None, "int4pack")
    for isa in ISAS:  # the int4 kernel's packing and ATen's both check the range
        with native.running_on(isa), pytest.raises(ValueError, match=r"int4pack takes weights in \[-8, 7\]"):
            linear_weight_only(torch.randn(1, 64), weight_q * 2, scale, None, 32, None, "int4pack")


def test_an_affine_group_plan_runs_int4pack_and_an_affine_channel_plan_is_refused(bf16_gemm):
    x = torch.randn(4, 64)
    affine_groups = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int4", symmetric=False,
                                                                           granularity=PerGroup(1, 32)))})
    qm = qcompile.compile(TinyBlock(width=64, hidden=128), x, calibration_data=[(torch.randn(8, 64),)],
                          qconfig=affine_groups, progress=False)
    linears = [n for n in qm.report.nodes if n.op == "linear"]
    assert [n.detail for n in linears] == ["qc.linear_weight_only via int4pack (groups of 32, affine), bf16 activations"] * 2
    affine_channels = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int8", symmetric=False,
                                                                             granularity=PerChannel(0)))})
    plan = get_qspec(next(n for n in annotated(TinyBlock(width=64, hidden=128), x, qconfig=affine_channels).graph.nodes
                          if n.name == "linear"))
    assert not plan.quantized and "affine weights" in plan.float_reason


def test_dequantized_grouped_weight_is_each_groups_scale_times_its_values():
    weight_q, scale = int4_groups(4, 64)
    w = dequantized_weight(weight_q, scale)
    assert w.shape == (4, 64)
    torch.testing.assert_close(w[2, 32:64], weight_q[2, 1].float() * scale[2, 1, 0])


def test_the_dispatch_refuses_what_a_kernel_cannot_run():
    weight_q, _ = int4_groups()
    int4 = WEIGHT_ONLY_KERNELS["int4pack"]
    assert int4.unsupported(weight_q, 32, 64) is None
    assert int4.unsupported(weight_q, 16, 64) == "int4pack takes groups of 32, 64, 128, 256, not 16"
    assert int4.unsupported(weight_q * 2, 32, 64) == "int4pack takes weights in [-8, 7]"
    assert int4.unsupported(weight_q, 32, 48) == "int4pack needs in_features a multiple of 32, not 48"
    with pytest.raises(ValueError, match="kernel 'int2pack' is not one of: int8pack, int4pack"):
        linear_weight_only(torch.randn(2, 64), weight_q, torch.ones(48, 2, 1), None, 32, None, "int2pack")
    with pytest.raises(ValueError, match="int8pack takes symmetric weights"):
        linear_weight_only(torch.randn(2, 64), weight_q.reshape(48, 64), torch.ones(48), torch.ones(48), 0, None,
                           "int8pack")


def test_convert_stores_groups_and_the_lowering_runs_int4pack(bf16_gemm):
    x = torch.randn(4, 64)
    model = TinyBlock(width=64, hidden=128)
    qdq = Convert()(annotated(model, x, qconfig=INT4_G32)).graph_module
    check_graph(qdq, """
    CHECK: constant up_weight_q : i8[128,2,32]
    CHECK: constant up_weight_scale : f32[128,2,1]
    CHECK: qc.dequantize.default({{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, None, torch.float32) : f32[128,2,32]
    CHECK: aten.view.default({{%[0-9]+}}, [128, 64]) : f32[128,64]
    CHECK: aten.linear.default(%0,
    """)
    assert not any(n.name.endswith("bias_q") for n in qdq.graph.nodes)  # weight-only: float bias
    out = assert_pass_contract(LowerWeightOnly(), qdq)
    check_graph(out, """
    CHECK: qc.linear_weight_only.default(%0, {{%[0-9]+}}, {{%[0-9]+}}, None, 32, {{%[0-9]+}}, 'int4pack')
    CHECK: qc.linear_weight_only.default({{.*}}, None, 32, {{%[0-9]+}}, 'int4pack')
    """)
    assert_outputs_close(qdq, out, [torch.randn(6, 64)], rtol=0.02)


@pytest.mark.parametrize("qconfig", [INT8_WO, INT4_G32], ids=["int8", "int4"])
def test_a_cpu_without_bf16_gemms_lowers_too_onto_its_own_paths(monkeypatch, qconfig):
    """Without native bf16 the operator runs ATen's integer-weight GEMVs for a few rows and an fp32
    GEMM for more (both faster than the reference form's dequantize per call): lowered all the same."""
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    qdq = Convert()(annotated(TinyBlock(width=64, hidden=128), torch.randn(4, 64), qconfig=qconfig)).graph_module
    out = assert_pass_contract(LowerWeightOnly(), qdq)
    check_graph(out, """
    CHECK: qc.linear_weight_only.default
    CHECK: qc.linear_weight_only.default
    """)
    with native.running_on("portable"):
        for rows in (4, native.GEMV_ROWS + 8):
            assert_outputs_close(qdq, out, [torch.randn(rows, 64)], rtol=0.02)


def test_a_group_that_does_not_divide_the_inputs_keeps_that_linear_float_with_the_reason():
    """TinyBlock's up-projection reads 16 channels, its down-projection 32: groups of 32 fit only
    the second, so annotate keeps the first float, saying why, before any calibration is spent."""
    model, x = TinyBlock(width=16, hidden=32), torch.randn(4, 16)
    result = Annotate(qconfig=INT4_G32)(cleaned(model, x))
    assert result.of_kind("unsupported") == {"linear": "per-group size 32 does not divide the 16 input channels"}
    planned = {n.name: get_qspec(n) for n in result.graph_module.graph.nodes if get_qspec(n) is not None}
    assert planned["linear_1"].quantized
    with pytest.warns(UserWarning, match="linear stays float: per-group size 32 does not divide the 16 input"):
        compiled = qcompile.compile(model, x, calibration_data=[(torch.randn(4, 16),) for _ in range(2)],
                                    qconfig=INT4_G32, progress=False)
    assert_outputs_close(model, compiled, [x], rtol=0.05)


def test_convert_refuses_a_planned_group_that_does_not_divide_the_inputs_naming_the_node():
    """A plan set by hand (a user's pass) skips annotate's check: convert names the node."""
    gm = annotated(TinyBlock(width=16, hidden=32), torch.randn(4, 16), qconfig=INT4_G16)
    up = next(n for n in gm.graph.nodes if n.name == "linear")
    plan = get_qspec(up)
    set_qspec(up, replace(plan, inputs=tuple((i, replace(e, spec=INT4_G32.by_op["linear"].weight))
                                             for i, e in plan.inputs)))
    with pytest.raises(qcompile.NodeError, match=r"per-group size 32 does not divide the 16 input channels.*linear"):
        Convert()(gm)


def test_minilm_weight_only(minilm, tmp_path):
    model, tokenizer = minilm
    embedder = SentenceEmbedder(model).eval()
    sentences = docstring_sentences(32)
    calibration = [minilm_inputs(tokenizer, sentences[:8], length=32)]
    evaluation = minilm_inputs(tokenizer, sentences[16:32], length=24)
    with torch.no_grad():
        expected = embedder(**evaluation)
    # int4 by round-to-nearest costs MiniLM about 0.044 of cosine (GPTQ is what closes it)
    for qconfig, floor, detail in ((INT8_WO, 0.999, "int8pack (per channel)"),
                                   (INT4_G32, 0.95, "int4pack (groups of 32)")):
        qm = qcompile.compile(embedder, calibration_data=calibration, qconfig=qconfig, progress=False,
                              outlier_smoothing=None)
        linears = [n for n in qm.report.nodes if n.op == "linear"]
        lowered = f"qc.linear_weight_only via {detail}"
        assert len(linears) == 36 and all(lowered in n.detail for n in linears), {n.detail for n in linears}
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(qm(**evaluation), expected)
        assert cosine.mean() > floor, float(cosine.mean())
        loaded = qcompile.load(qm.save(tmp_path / "minilm.qc"))
        with torch.no_grad():
            torch.testing.assert_close(loaded(**evaluation), qm(**evaluation))


@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_weights_export_as_matmulnbits_holding_the_same_weights(tmp_path, symmetric):
    spec = QuantSpec("int4", symmetric=symmetric, granularity=PerGroup(1, 32))
    x = torch.randn(4, 64)
    qm = qcompile.compile(TinyBlock(width=64, hidden=128), x, calibration_data=[(torch.randn(16, 64),)],
                          qconfig=QConfig(by_op={"linear": OpQuantConfig(None, spec)}), progress=False)
    exported = qm.export_onnx(tmp_path / "grouped.onnx", accuracy_level=1)
    assert exported.check.ort_ops["MatMulNBits"] == 2 and exported.check.worst.max_steps < 1e-2
    assert exported.check.accuracy_level_steps == 0 and "MatMulNBits x2" in str(exported)
    model = onnx.load(tmp_path / "grouped.onnx")
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in nbits for a in n.attribute if a.name == "accuracy_level")
    assert exported.bytes < 0.4 * exported.float_bytes
    # ONNX Runtime's MatMulNBits holds the grouped dequantize in torch bit for bit: fed the identity, it returns W
    qdq = qm.qdq_graph_module
    views = [n.args[1] for n in qdq.graph.nodes if n.target == torch.ops.aten.linear.default]
    for node, view in zip(nbits, views, strict=True):
        ours = constant_expression(qdq, view)
        single = matmul_nbits._alone(model, node, matmul_nbits.FLOAT_ACTIVATIONS)
        session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {node.input[0]: np.eye(ours.shape[1], dtype=np.float32)})[0]
        assert torch.equal(torch.from_numpy(theirs), ours.t())


class OutlierInput(torch.nn.Module):
    """Two linears: the first reads Gaussian values, the second one channel 100x the others (the
    outlier features of LLM activations), which an int8 block quantizes coarsely."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.first, self.second = torch.nn.Linear(128, 128), torch.nn.Linear(128, 32)
        self.register_buffer("gain", torch.ones(128).index_fill(0, torch.tensor([7]), 100.0))

    def forward(self, x):
        return self.second(self.first(x) * self.gain)


def test_each_matmulnbits_gets_int8_activations_only_where_they_are_measured_safe(tmp_path):
    spec = QuantSpec("int4", granularity=PerGroup(1, 128))
    x = torch.randn(16, 128)
    qm = qcompile.compile(OutlierInput(), x, calibration_data=[(torch.randn(16, 128),)],
                          qconfig=QConfig(by_op={"linear": OpQuantConfig(None, spec)}), progress=False)
    exported = qm.export_onnx(tmp_path / "auto.onnx")
    first, second = exported.check.accuracy_levels
    assert (first.level, second.level) == (matmul_nbits.INT8_ACTIVATIONS, matmul_nbits.FLOAT_ACTIVATIONS)
    # (crest_x / crest_w)² · (7/127)² (the module doc): Gaussian activations into nn.Linear's uniform
    # weights (crest √3) add about 1 % of the 4-bit weights' noise, the outlier block (crest √128) 13 %
    assert first.noise_ratio == pytest.approx(0.009, rel=0.3) and second.noise_ratio == pytest.approx(0.13, rel=0.3)
    assert second.sqnr_db < first.sqnr_db
    written = {n.name: a.i for n in onnx.load(tmp_path / "auto.onnx").graph.node if n.op_type == "MatMulNBits"
               for a in n.attribute if a.name == "accuracy_level"}
    assert written == {first.node: 4, second.node: 1}
    assert "accuracy_level 4 (int8 activations) on 1 and 1 on the others" in str(exported)
    everywhere = qm.export_onnx(tmp_path / "int8.onnx", accuracy_level=4)
    assert everywhere.check.accuracy_level_steps > exported.check.accuracy_level_steps
    with pytest.raises(qcompile.QCompileError, match="accuracy_level is 'auto', 1 .* or 4 .*, not 2"):
        qm.export_onnx(tmp_path / "bad.onnx", accuracy_level=2)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("block", [32, 128])
def test_weight_rounding_noise_estimates_what_rounding_to_nearest_puts_on_the_output(block):
    """The S²/12 model against the real thing: a float weight rounded to nearest in 4-bit blocks,
    its output error measured on inputs whose rows differ in power."""
    g = torch.Generator().manual_seed(block)
    depth, outputs = 512, 256
    w = torch.randn(depth, outputs, generator=g, dtype=torch.float64)
    blocks = w.reshape(depth // block, block, outputs)
    scale = blocks.abs().amax(1) / 7  # [K/B, N]
    rounded = (torch.round(blocks / scale[:, None]).clamp(-8, 7) * scale[:, None]).reshape(depth, outputs)
    x = torch.randn(8, depth, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, depth, dtype=torch.float64)
    measured = float((x @ (rounded - w)).square().sum())
    node = onnx.helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain=matmul_nbits.MICROSOFT,
                                 K=depth, N=outputs, bits=4, block_size=block, accuracy_level=1)
    graph = onnx.helper.make_graph([node], "g", [], [], [onnx.numpy_helper.from_array(
        scale.t().contiguous().float().numpy(), "scales")])
    estimate = matmul_nbits.weight_rounding_noise(onnx.helper.make_model(graph), node, x.float().numpy())
    assert estimate == pytest.approx(measured, rel=0.1)


def test_qat_per_group_weights_run_on_int4pack_after_convert_qat(bf16_gemm):
    model = TinyBlock(width=64, hidden=128)
    data = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    qat = qcompile.prepare_qat(model, calibration_data=data, qconfig=INT4_G32, progress=False)
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for x, in data * 3:
        loss = (qat(x) - model(x).detach()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qm = qcompile.convert_qat(qat)
    linears = [n for n in qm.report.nodes if n.op == "linear"]
    assert [n.detail for n in linears] == ["qc.linear_weight_only via int4pack (groups of 32), bf16 activations"] * 2
    qat.eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qat(x), atol=0.02, rtol=0)  # bf16 activations against fp32 fake-quant


W4A8_G32 = QConfig(by_op={"linear": OpQuantConfig(qcompile.qconfig.INT8_ACTIVATION,
                                                  QuantSpec("int4", False, PerGroup(1, 32), "mse"))})


def test_w4a8_groups_are_planned_with_uint8_activations_and_converted_to_both_qdq_forms(bf16_gemm):
    """uint8 activations with int4 groups: planned (no int32 bias: no integer accumulator takes a
    scale per group) and converted to activation Q/DQ -> grouped weight Q/DQ -> linear, which
    lower-weight-only makes qc.linear_w4a8 (tests/test_linear_w4a8.py)."""
    x = torch.randn(4, 64)
    model = TinyBlock(width=64, hidden=128)
    planned = calibrated(model, x, qconfig=W4A8_G32)
    plans = [get_qspec(n) for n in planned.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [[edge.role for _, edge in plan.inputs] for plan in plans] == [["activation", "weight"]] * 2
    assert all(plan.quantized and edge.spec.dtype == "int4" for plan in plans for _, edge in plan.inputs[1:])
    qdq = Convert()(planned).graph_module
    check_graph(qdq, """
    CHECK: %3 = qc.quantize.default(%0, %1, %2, None, 0, 255, torch.uint8)
    CHECK-NEXT: %4 = qc.dequantize.default(%3, %1, %2, None, torch.float32)
    CHECK: aten.view.default({{%[0-9]+}}, [128, 64]) : f32[128,64]
    CHECK: aten.linear.default(%4,
    """)


def test_per_token_activations_run_in_front_of_the_weight_only_kernel_and_into_the_int8_linear():
    """W4A8 groups put choose_qparams_per_token before the kernel; the int8 linear takes the same
    activations with an int8 weight (each row's scale in its epilogue); a convolution, whose kernel
    takes one input scale, refuses them and says so."""
    model = TinyBlock(width=64, hidden=128)
    data = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    w4a8 = QConfig(by_op={"linear": OpQuantConfig(TOKEN_ACTIVATION, W4A8_G32.by_op["linear"].weight)})
    qm = qcompile.compile(model, calibration_data=data, qconfig=w4a8, outlier_smoothing=None, progress=False)
    check_graph(qm.qdq_graph_module, """
    CHECK: qc.choose_qparams_per_token.default
    CHECK: qc.quantize.default
    CHECK: aten.linear.default
    """)
    int8 = QConfig(by_op={"linear": OpQuantConfig(TOKEN_ACTIVATION, qcompile.qconfig.INT8_WEIGHT)})
    dynamic = qcompile.compile(model, calibration_data=data, qconfig=int8, outlier_smoothing=None, progress=False)
    linears = [n for n in dynamic.report.nodes if n.op == "linear"]
    assert len(linears) == 2 and all(n.precision == "int8" and "qc.linear_int8" in n.detail for n in linears)
    conv = QConfig(by_op={"conv2d": OpQuantConfig(TOKEN_ACTIVATION, qcompile.qconfig.INT8_WEIGHT)})
    images = [(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    with pytest.warns(UserWarning, match="activation granularity per-token"):
        refused = qcompile.compile(TinyConvNet(), calibration_data=images, qconfig=conv, progress=False)
    assert all(n.precision == "float" and "kernel takes per-tensor" in n.detail
               for n in refused.report.nodes if n.op == "conv2d")


def test_merged_projections_that_stay_reference_each_say_why(monkeypatch):
    """q/k/v merged into one linear that no weight-only kernel runs (here an int8pack taking half
    the range): each projection's report line gives the merged linear's reason, not just "not lowered"."""
    from tests.models import TinySelfAttention

    monkeypatch.setitem(WEIGHT_ONLY_KERNELS, "int8pack", WeightOnlyKernel("int8pack", -64, 63, grouped=False))
    model = TinySelfAttention(width=64)
    data = [(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    qm = qcompile.compile(model, calibration_data=data, qconfig=INT8_WO, progress=False)
    merged = next(p for p in qm.report.passes if p.name == "merge-sibling-linears")
    assert merged.changed
    details = {n.name: n.detail for n in qm.report.nodes if n.op == "linear"}
    assert len(details) == 4
    assert all(detail.endswith("int8pack takes weights in [-64, 63]") for detail in details.values()), details
