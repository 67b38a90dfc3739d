"""cpu-fp8: qc.linear_fp8's paths against their reference, the lowering's graph diff and path
choice, and all-MiniLM-L6-v2 end to end (fidelity, bytes, save/load)."""

import re
import time

import pytest
import torch

import qcompile
from qcompile.kernel_check import kernel_contracts
from qcompile.latency import LatencyTable
from qcompile.qconfig import fp8_qconfig
from qcompile.targets.cpu_fp8 import Fp8OrInt8, LowerCpuFp8, capabilities, cpu_fp8_preset
from qcompile.targets import cpu_features
from qcompile.targets.cpu_fp8 import fp8_or_int8
from qcompile.targets.cpu_fp8.kernels import decoded_weight, linear_fp8, reference_linear_fp8
from qcompile.testing import assert_graph_diff, assert_outputs_close, assert_pass_contract, check_graph
from tests.models import SentenceEmbedder, TinyBlock, docstring_sentences, minilm_inputs
from tests.quant_stages import calibrated
from qcompile.passes import CastFp8, EliminateDequant
from qcompile.targets.cpu_int8.capabilities import KERNEL_WEIGHT_DTYPE

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_weight(out_features: int, in_features: int, dtype=E4M3, seed: int = 0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    scale = weight.abs().amax(1) / torch.finfo(dtype).max
    return (weight / scale[:, None]).to(dtype), scale


# The FP8 GEMM needs FP8 activations: the lowering never picks it for a weight-only linear.
@pytest.mark.parametrize("path, activations", [
    (path, activations) for path in ("bf16", "scaled-mm") for activations in ("per-tensor", "per-token", "e5m2")
] + [("bf16", "weight-only")])
def test_linear_fp8_keeps_its_contract(path, activations):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3
    dtype = E5M2 if activations == "e5m2" else E4M3
    weight, weight_scale = fp8_weight(48, 64, dtype)
    scale = {"per-tensor": torch.tensor([x.abs().max() / 448]), "e5m2": torch.tensor([x.abs().max() / 57344]),
             "per-token": x.abs().amax(-1, keepdim=True) / 448, "weight-only": None}[activations]
    if scale is not None:  # the graph's quantize casts x; the kernel reads the FP8 values
        x = torch.ops.qc.quantize(x, scale, torch.zeros_like(scale, dtype=torch.int32), None,
                                  -int(torch.finfo(dtype).max), int(torch.finfo(dtype).max), dtype)
    bias = torch.randn(48)
    y = linear_fp8(x, scale, weight, weight_scale, bias, torch.float32, path)
    expected = reference_linear_fp8(x, scale, weight, weight_scale, bias, torch.float32, path)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    # bf16 operands, fp32 accumulation: within two bf16 ulps of the largest output
    assert float((y - expected).abs().max() / expected.abs().max()) < 2.0**-7
    assert kernel_contracts()[torch.ops.qc.linear_fp8.default].precision == torch.bfloat16


def test_weights_are_decoded_once_per_tensor():
    weight, scale = fp8_weight(16, 32)
    first = decoded_weight(weight, scale)
    assert decoded_weight(weight, scale) is first and first.dtype == torch.bfloat16
    torch.testing.assert_close(first.float(), weight.float() * scale[:, None], rtol=2.0**-8, atol=0)


def test_bad_arguments_are_refused():
    weight, scale = fp8_weight(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="path 'fp4' is not one of: scaled-mm, bf16"):
        linear_fp8(x, None, weight, scale, None, torch.float32, "fp4")
    with pytest.raises(ValueError, match="must be 2-D float8"):
        linear_fp8(x, None, weight.float(), scale, None, torch.float32, "bf16")
    with pytest.raises(ValueError, match="a float8 activation with its scale, or a float one without"):
        linear_fp8(x, torch.tensor([0.1]), weight, scale, None, torch.float32, "bf16")
    with pytest.raises(ValueError, match="scaled-mm path needs FP8 activations"):
        linear_fp8(x, None, weight, scale, None, torch.float32, "scaled-mm")


def test_no_fp8_gemm_without_amx(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    assert not capabilities.has_fp8_gemm() and capabilities.available_paths() == ("bf16",)
    assert cpu_fp8_preset().by_op["linear"].activation is None  # weight-only: FP8 activations only add work here
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"amx_tile", "amx_int8", "amx_bf16"}))
    monkeypatch.setattr(cpu_features, "fp8_gemm_runs_natively", lambda: True)  # even if a probe misreads it
    assert capabilities.available_paths() == ("bf16",)  # a Sapphire Rapids: oneDNN's reference FP8 kernel
    assert cpu_fp8_preset().by_op["linear"].activation is None
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"amx_tile", "amx_int8", "amx_bf16", "amx_fp16"}))
    monkeypatch.setattr(cpu_features, "fp8_gemm_runs_natively", lambda: False)  # timed slow after all
    assert capabilities.available_paths() == ("bf16",)
    monkeypatch.setattr(cpu_features, "fp8_gemm_runs_natively", lambda: True)
    assert capabilities.available_paths() == ("scaled-mm", "bf16")
    assert cpu_fp8_preset().by_op["linear"].activation.dtype == "float8_e4m3fn"


def test_fastest_path_takes_the_lowest_median_once_per_machine(tmp_path):
    calls = []

    def run(path):
        calls.append(path)
        time.sleep(0.002 if path == "slow" else 0.0)
    table = LatencyTable(tmp_path / "latency.json")
    assert capabilities.fastest_path(("slow", "fast"), run, "8x16", table) == "fast"
    assert table.measured == 2 and calls
    calls.clear()  # a later lowering on this machine (a load) reads the times back
    assert capabilities.fastest_path(("slow", "fast"), run, "8x16", LatencyTable(tmp_path / "latency.json")) == "fast"
    assert not calls
    assert capabilities.fastest_path(("only",), lambda p: pytest.fail("one candidate is not timed"), "8x16") == "only"


def qdq_fp8(model, x, qconfig):
    observed = calibrated(model, x, qconfig=qconfig, target="cpu-fp8")
    return EliminateDequant()(CastFp8()(observed).graph_module).graph_module


def test_lowering_graph_diff_and_paths_in_the_diagnostics():
    x = torch.randn(4, 16)
    before = qdq_fp8(TinyBlock(), x, fp8_qconfig())
    result = LowerCpuFp8(paths=("scaled-mm", "bf16"))(before)  # both timed at each linear's shape
    out = assert_pass_contract(LowerCpuFp8(), before)
    # the first linear writes bf16: GELU runs in bf16 and the FP8 cast reads it
    check_graph(out, """
    CHECK: qc.linear_fp8.default({{%[0-9]+}}, %1, {{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, torch.bfloat16, 'bf16') : bf16
    CHECK: aten.gelu.default({{%[0-9]+}}) : bf16
    CHECK-NOT: aten.linear.default
    CHECK: qc.linear_fp8.default({{.*}}, torch.float32, 'bf16') : f32
    """)
    assert_outputs_close(before, out, [torch.randn(6, 16)], rtol=0.02)
    paths = result.of_kind("path")
    assert set(paths) == {"linear", "linear_1"}
    assert all(reason.startswith(("scaled-mm", "bf16")) and "timed" in reason for reason in paths.values())
    assert LowerCpuFp8(paths=("scaled-mm", "bf16"))(before).of_kind("path") == paths  # the times are read back
    assert LowerCpuFp8()(before).of_kind("path")["linear"] == (
        "bf16 (float8_e4m3fn activations): FP8 weights decoded once to bf16: this CPU has no FP8 GEMM (no AMX), "
        "and torch's would convert both operands to fp32 on every call") or capabilities.has_fp8_gemm()


def test_lowering_weight_only_and_per_token():
    x = torch.randn(4, 16)
    for qconfig, operands in ((fp8_qconfig(activations=None), "%0, None"),
                              (fp8_qconfig(activations="per-token"), "{{%[0-9]+}}, {{%[0-9]+}}")):
        before = qdq_fp8(TinyBlock(), x, qconfig)
        out = assert_pass_contract(LowerCpuFp8(), before)
        check_graph(out, f"CHECK: qc.linear_fp8.default({operands}, ")
        assert_outputs_close(before, out, [torch.randn(3, 16)], rtol=0.02)


def run_in_context(p, gm, x):
    """``p`` as a compile runs it: through the pass manager, with the example inputs in the context."""
    context = qcompile.CompileContext(qcompile.get_target("cpu-fp8"), ((x,), {}))
    result = qcompile.PassManager([p], context=context, initial_properties={"annotated", "observed", "calibrated"})(gm)
    return result, result.records[0]


def test_fp8_or_int8_plans_int8_where_it_is_as_faithful():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    before = calibrated(TinyBlock(), x, qconfig=fp8_qconfig(), target="cpu-fp8")
    result, record = run_in_context(Fp8OrInt8(), before, x)
    after = result.graph_module
    assert_graph_diff(before, after, exact=False,
                      added=["%observer_0 = module[observer_2](%x)", "%linear = {{.*}}0=activation:uint8/affine/per-tensor{{.*}}"],
                      removed=["%observer_0 = module[observer_0](%x)"])
    # well-behaved activations: INT8's uniform grid beats E4M3's 3-bit mantissa at both linears
    formats = {d.node: d.reason for d in record.diagnostics if d.kind == "format"}
    assert set(formats) == {"linear", "linear_1"} and all(r.startswith("int8: SQNR") for r in formats.values())
    int8, fp8 = (float(v) for v in re.findall(r"([\d.]+) dB", formats["linear"]))
    assert int8 > fp8 + 3
    plan = dict(qcompile.ir.meta.get_qspec(next(n for n in after.graph.nodes if n.name == "linear")).inputs)
    assert (plan[0].spec.dtype, plan[1].spec.dtype, plan[2].spec.dtype) == ("uint8", KERNEL_WEIGHT_DTYPE, "int32")
    observer = after.get_submodule("observer_2")
    assert observer.spec.dtype == "uint8" and observer.batches == before.get_submodule("observer_0").batches
    assert_outputs_close(before, after, [x], rtol=0)  # observers pass values through: same outputs


def test_fp8_or_int8_keeps_fp8_where_outliers_make_int8_worse():
    # one input channel 300 times the others (its weights as much smaller, as in a transformer whose
    # LayerNorm scales one channel up): a uniform grid over its range leaves the rest a step or two
    model = torch.nn.Sequential(torch.nn.Linear(16, 32)).eval()
    with torch.no_grad():
        model[0].weight[:, 3] /= 300
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 300
    before = calibrated(model, x, qconfig=fp8_qconfig(), target="cpu-fp8")
    before.get_submodule("observer_0").reset()
    before.get_submodule("observer_0")(x)  # calibrated on these very inputs
    result, record = run_in_context(Fp8OrInt8(), before, x)
    (reason,) = [d.reason for d in record.diagnostics if d.kind == "format"]
    assert reason.startswith("fp8: SQNR") and not result.modified, reason


def test_fp8_or_int8_changes_nothing_where_the_cpu_has_an_fp8_gemm(monkeypatch):
    monkeypatch.setattr(fp8_or_int8, "has_fp8_gemm", lambda: True)
    x = torch.randn(8, 16)
    before = calibrated(TinyBlock(), x, qconfig=fp8_qconfig(), target="cpu-fp8")
    result, record = run_in_context(Fp8OrInt8(), before, x)
    assert not result.modified and record.stats == {"skipped": "this CPU has an FP8 GEMM"}


@pytest.fixture(scope="module")
def minilm_fp8_data(minilm):
    model, tokenizer = minilm
    sentences = docstring_sentences(48)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 8], length=32) for i in range(0, 24, 8)]
    evaluation = minilm_inputs(tokenizer, sentences[32:48], length=24)
    return SentenceEmbedder(model).eval(), calibration, evaluation


# The preset (weight-only E4M3 on this CPU) and W8A8 E4M3 with fp8-or-int8's INT8 linears; the
# W8A8 file also holds int32 biases and per-node scales of both formats.
@pytest.mark.parametrize("qconfig, floor, size", [(None, (0.998, 0.997), 0.27), (fp8_qconfig(), (0.99, 0.98), 0.275)])
def test_minilm_cpu_fp8(minilm_fp8_data, qconfig, floor, size, tmp_path):
    embedder, calibration, evaluation = minilm_fp8_data
    qm = qcompile.compile(embedder, calibration_data=calibration, target="cpu-fp8", qconfig=qconfig, progress=False)
    with torch.no_grad():
        expected = embedder(**evaluation)
        cosine = torch.nn.functional.cosine_similarity(qm(**evaluation), expected)
    print(f"cosine mean {cosine.mean():.5f} min {cosine.min():.5f}")
    assert cosine.mean() > floor[0] and cosine.min() > floor[1]
    lines = {n.name: n for n in qm.report.nodes}
    linears = [n for n in qm.report.nodes if n.op == "linear"]
    assert len(linears) == 36
    for n in linears:  # every linear on a kernel: FP8 ones on the bf16 path, those fp8-or-int8 moved on oneDNN's
        assert (n.precision, n.detail.split(" ")[0]) in {("fp8", "qc.linear_fp8"), ("int8", "qc.linear_int8"),
                                                         ("int8", "qc.linear_int8+add")}, n
    if qconfig is not None:
        # FFN down-projections read GELU's outliers: in the first layers FP8's relative steps keep them better
        assert lines["linear_5"].precision == "fp8" and lines["linear_11"].precision == "fp8"
        assert sum(n.precision == "int8" for n in linears) >= 12
    assert lines["embedding"].detail == "float8_e4m3fn rows looked up, then dequantized -> float32"
    path = qm.save(tmp_path / "minilm.qc")
    float_bytes = sum(t.numel() * 4 for t in embedder.state_dict().values())
    assert path.stat().st_size <= size * float_bytes
    loaded = qcompile.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**evaluation), qm(**evaluation))


def test_a_cpu_fp8_plan_replays_per_token_margins_and_the_int8_mix(tmp_path):
    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    for qconfig in (fp8_qconfig(activations="per-token", margin=2), fp8_qconfig()):
        first = qcompile.compile(TinyBlock(), calibration_data=data, target="cpu-fp8", qconfig=qconfig, progress=False)
        path = first.report.write_plan(tmp_path / "plan.json")
        replayed = qcompile.compile(TinyBlock(), calibration_data=data, target="cpu-fp8", plan=path, progress=False)
        assert [n.precision for n in replayed.report.nodes] == [n.precision for n in first.report.nodes]
        x = torch.randn(5, 16)
        assert torch.equal(replayed(x), first(x))
