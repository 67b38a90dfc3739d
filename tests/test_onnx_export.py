"""ONNX QDQ export: int8 initializers, ONNX Runtime's fused int8 kernels, the cross-check, bad input."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxscript import opset21 as op
from qcompile.passes import InsertObservers

import qcompile
from qcompile.targets.onnx_qdq import export as onnx_export
from qcompile.qdq import DEQUANTIZE
from tests.models import (
    SentenceEmbedder,
    TinyBlock,
    TinyConvNet,
    TinyTokenEncoder,
    docstring_sentences,
    minilm_inputs,
)
from tests.quant_stages import annotated


def batches(shape, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(count)]


def optimized_ops(path, tmp_path) -> Counter:
    """Op counts of the graph ONNX Runtime actually runs after its QDQ fusions."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def run(path, *inputs) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})[0]


def test_weights_are_int8_initializers_and_the_file_passes_the_full_checker(tmp_path):
    qm = qcompile.compile(TinyConvNet(), calibration_data=batches((4, 1, 8, 8)), progress=False)
    result = qm.export_onnx(tmp_path / "tiny.onnx")
    model = onnx.load(result.path)
    onnx.checker.check_model(model, full_check=True)
    initializers = {i.name: i for i in model.graph.initializer}
    weight_inputs = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    producers = {out: n for n in model.graph.node for out in n.output}
    for name in weight_inputs:
        dequantize = producers[name]
        assert dequantize.op_type == "DequantizeLinear"
        assert initializers[dequantize.input[0]].data_type == onnx.TensorProto.INT8
        assert next(a.i for a in dequantize.attribute if a.name == "axis") == 0  # per output channel
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1 for i in model.graph.initializer)


def test_resnet_onnx_qdq_runs_every_conv_and_residual_add_as_onnxruntime_int8_kernels(resnet, image_batch, tmp_path):
    qm = qcompile.compile(resnet, (image_batch,), target="onnx-qdq", calibration_data=batches((2, 3, 64, 64), 2),
                          progress=False)
    result = qm.export_onnx(tmp_path / "resnet18.onnx")
    ops = optimized_ops(result.path, tmp_path)
    assert ops["QLinearConv"] == 20 and ops["QLinearAdd"] == 7 and ops["QGemm"] == 1
    assert ops["Conv"] == ops["FusedConv"] == 0  # no convolution left in float
    assert result.check.int8_kernels == {"QLinearConv": 20, "QLinearAdd": 7, "QGemm": 1}
    assert result.bytes < 0.27 * result.float_bytes  # int8 weights: about a quarter of fp32
    # All 8 adds join convolutions and get uint8 inputs; the last one's output feeds the float
    # average pool, so ONNX Runtime runs that one as DQ -> Add (7 QLinearAdd above).
    assert [n.precision for n in qm.report.nodes if n.op == "add"] == ["int8-ref"] * 8


def test_cpu_int8_result_exports_its_qdq_stage_and_the_batch_stays_dynamic(tmp_path):
    model = TinyBlock()
    qm = qcompile.compile(model, calibration_data=batches((8, 16)), progress=False)
    result = qm.export_onnx(tmp_path / "block.onnx")
    assert result.check.worst.max_steps <= 1
    x = torch.randn(3, 16)  # not the example's batch of 8
    with torch.no_grad():
        expected = qm.qdq_graph_module(x).numpy()
    np.testing.assert_allclose(run(result.path, x), expected, atol=0.05)
    ops = optimized_ops(result.path, tmp_path)
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] == 2


def test_a_residual_add_into_layer_norm_is_a_sum_that_also_takes_the_linear_bias(tmp_path):
    batch = (torch.randn(2, 5, 16),)
    qm = qcompile.compile(TinyBlock(), batch, target="onnx-qdq", calibration_data=batches((2, 5, 16)),
                          progress=False, outlier_smoothing=None)
    result = qm.export_onnx(tmp_path / "block.onnx")
    assert result.check.worst.max_steps <= 1
    model = onnx.load(result.path)
    layer_norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    producer = next(n for n in model.graph.node if layer_norm.input[0] in n.output)
    initializers = {i.name: list(i.dims) for i in model.graph.initializer}
    assert producer.op_type == "Sum" and len(producer.input) == 3  # linear output, residual, bias
    assert [initializers.get(name) for name in producer.input].count([16]) == 1
    ops = optimized_ops(result.path, tmp_path)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = qm.qdq_graph_module(x).numpy()
    np.testing.assert_allclose(run(result.path, x), expected, atol=1e-4)


def test_an_int8_table_is_gathered_as_int8_rows_and_their_scales(tmp_path):
    ids = [(torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    qm = qcompile.compile(TinyTokenEncoder(), target="onnx-qdq", calibration_data=ids, progress=False)
    result = qm.export_onnx(tmp_path / "tokens.onnx")
    assert result.check.worst.max_steps <= 1
    model = onnx.load(result.path)
    tables = {i.name: i for i in model.graph.initializer if list(i.dims) == [50, 16]}
    assert [t.data_type for t in tables.values()] == [onnx.TensorProto.INT8]
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    assert set(tables) <= gathered  # rows are looked up in int8, not dequantized as a whole table
    batch = torch.randint(0, 50, (3, 8))  # another batch size: the lookup's shape stays dynamic
    with torch.no_grad():
        expected = qm.qdq_graph_module(batch).numpy()
    np.testing.assert_allclose(run(result.path, batch), expected, atol=1e-5)


def test_minilm_linears_all_fuse_into_matmul_integer_to_float(minilm, tmp_path):
    model, tokenizer = minilm
    embedder = SentenceEmbedder(model).eval()
    sentences = docstring_sentences(24)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 8], length=32) for i in (0, 8)]
    qm = qcompile.compile(embedder, calibration_data=calibration, progress=False)
    result = qm.export_onnx(tmp_path / "minilm.onnx")
    # every encoder linear, and the linear of each FFN's split-off GELU outlier channels
    smoothing = next(p.stats for p in qm.report.passes if p.name.startswith("smooth-outliers"))
    split_ffns = len(smoothing.get("split", {}))
    assert split_ffns > 0
    assert result.check.int8_kernels["MatMulIntegerToFloat"] == 36 + split_ffns
    ops = optimized_ops(result.path, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 36 + split_ffns
    # Batched linears' biases are float constants in the file, so ONNX Runtime folds FFN1's into
    # BiasGelu; the residual adds are Sums that also take the bias of the linear they add, and
    # stay out of SkipLayerNormalization (a slow CPU kernel). The one DequantizeLinear left to run
    # reads the int8 vocabulary rows the batch looked up (Gather on the int8 table and its scales).
    assert ops["SkipLayerNormalization"] == 0 and ops["Sum"] == 12 and ops["LayerNormalization"] == 13
    assert ops["BiasGelu"] == 6 + split_ffns and ops["DequantizeLinear"] == 1
    linears = 36 + split_ffns  # weights, biases, activations: the export left the Q/DQ graph as it was
    assert sum(n.target == DEQUANTIZE for n in qm.qdq_graph_module.graph.nodes) == linears + linears + 24 + 1
    assert result.bytes < 0.3 * result.float_bytes  # the 47 MB vocabulary table is int8 too
    evaluation = minilm_inputs(tokenizer, sentences[16:24], length=32)
    with torch.no_grad():
        reference = embedder(**evaluation)
    embedding = torch.from_numpy(run(result.path, evaluation["input_ids"], evaluation["attention_mask"]))
    assert torch.nn.functional.cosine_similarity(embedding, reference).mean() > 0.98


def test_cross_check_names_the_first_tensor_a_wrong_translation_breaks(tmp_path, monkeypatch):
    def dequantize_ignoring_zero_point(q, scale, zero_point, axis, out_dtype):
        if axis is None:  # activations (uint8, zero point != 0): the zero point is dropped
            return op.DequantizeLinear(q, onnx_export._per_tensor_scale(scale))
        return onnx_export._dequantize_linear(q, scale, zero_point, axis, out_dtype)

    monkeypatch.setitem(onnx_export.TRANSLATIONS, DEQUANTIZE, dequantize_ignoring_zero_point)
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), progress=False)
    # The input quantize sees only float inputs and agrees; the gelu output is the first
    # quantized tensor computed from a (wrongly) dequantized one.
    with pytest.raises(qcompile.QCompileError, match=r"diverge at quantized tensor 'quantize_1': \d+ steps"):
        qm.export_onnx(tmp_path / "wrong.onnx")


def test_tolerance_is_configurable(tmp_path):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), progress=False)
    result = qm.export_onnx(tmp_path / "block.onnx", tolerance_steps=0.5)
    assert all(t.max_steps <= 0.5 for t in result.check.tensors)
    assert "worst" in str(result) and "MB" in str(result)


def test_an_op_without_onnx_translation_is_named_with_its_node(tmp_path):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), progress=False)
    with pytest.raises(qcompile.QCompileError, match=r"qc::linear_int8 has no ONNX translation.*linear_int8_default.*module 'up'"):
        qcompile.export_onnx(qm.graph_module, tmp_path / "lowered.onnx", (torch.randn(8, 16),))
    per_token = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), target="cpu-fp8", progress=False,
                                 qconfig=qcompile.fp8_qconfig(activations="per-token"))
    with pytest.raises(qcompile.QCompileError, match=r"qc::choose_qparams_per_token has no ONNX translation "
                                                     r"\(per-token scales: ONNX quantizes dynamically per tensor only"):
        per_token.export_onnx(tmp_path / "per_token.onnx")
    assert not (tmp_path / "per_token.onnx").exists()


def test_dynamic_quantization_exports_as_dynamic_quantize_linear(tmp_path):
    dynamic = qcompile.compile(TinyBlock(), (torch.randn(8, 16),))
    result = dynamic.export_onnx(tmp_path / "dynamic.onnx")
    model = onnx.load(result.path)
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) == 2
    assert result.check.worst.max_steps <= 1  # ONNX's scale and zero point are qc.choose_qparams's
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = dynamic.qdq_graph_module(x)
    torch.testing.assert_close(torch.from_numpy(run(result.path, x)), expected, atol=0.05, rtol=0)


def test_an_unwritable_path_is_an_error_naming_it(tmp_path):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), progress=False)
    missing = tmp_path / "no" / "such" / "folder" / "m.onnx"
    with pytest.raises(qcompile.QCompileError, match=r"cannot write the ONNX file '.*m\.onnx'"):
        qm.export_onnx(missing)
    with pytest.raises(qcompile.QCompileError, match="it is a folder"):
        qm.export_onnx(tmp_path)


def test_a_graph_that_was_never_calibrated_is_refused(tmp_path):
    x = torch.randn(4, 16)
    observed = InsertObservers()(annotated(TinyBlock(), x)).graph_module
    with pytest.raises(qcompile.QCompileError, match="never calibrated"):
        qcompile.export_onnx(observed, tmp_path / "observed.onnx", (x,))
    assert not (tmp_path / "observed.onnx").exists()


def test_a_sequential_model_whose_input_fx_renames_exports_and_cross_checks(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    qm = qcompile.compile(model, calibration_data=batches((4, 8)), progress=False)
    result = qm.export_onnx(tmp_path / "seq.onnx")  # forward(input): fx calls it input_1
    x = torch.randn(3, 8)
    np.testing.assert_allclose(run(result.path, x), qm.qdq_graph_module(x).detach().numpy(), atol=1e-4)


def test_a_failed_export_leaves_no_file_and_keeps_an_older_one(tmp_path, monkeypatch):
    qm = qcompile.compile(TinyConvNet(), calibration_data=batches((4, 1, 8, 8)), progress=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an older export")

    def diverges(*args, **kwargs):
        raise qcompile.QCompileError("ONNX Runtime and the Q/DQ graph diverge")

    monkeypatch.setattr(onnx_export, "cross_check", diverges)
    with pytest.raises(qcompile.QCompileError, match="diverge"):
        qm.export_onnx(path)
    assert path.read_bytes() == b"an older export" and list(tmp_path.iterdir()) == [path]


def test_the_same_compile_exports_byte_identical_files(tmp_path):
    paths = []
    for i in range(2):
        qm = qcompile.compile(TinyConvNet(), calibration_data=batches((4, 1, 8, 8)), progress=False)
        paths.append(qm.export_onnx(tmp_path / f"m{i}.onnx").path)
    assert paths[0].read_bytes() == paths[1].read_bytes()


class ConvThenDepthwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.dw(torch.nn.functional.relu6(self.a(x)))


def test_the_summary_says_which_quantized_weight_ops_onnx_runtime_still_runs_in_float(tmp_path):
    g = torch.Generator().manual_seed(0)
    qm = qcompile.compile(ConvThenDepthwise(), calibration_data=[(torch.randn(2, 3, 16, 16, generator=g),)
                                                                for _ in range(3)], progress=False)
    with pytest.warns(UserWarning, match="ONNX Runtime fused 1 of the 2 quantized convolutions and linears"):
        exported = qm.export_onnx(tmp_path / "dw.onnx")
    assert exported.quantized_weight_ops == 2 and exported.check.int8_weight_kernels == 1
    assert "1 run in float on dequantized weights" in str(exported)
    assert exported.unfused_ops == ("conv2d_1 (dw Conv2d)",)  # named: the depthwise one, whose output is float


class EfficientBlocks(torch.nn.Module):
    """What EfficientNet and MobileNet do around their convolutions: a TF-style one-sided pad
    before a strided stem, SiLU, squeeze-excite, and residual adds onto the previous block's sum."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, width, 3, stride=2)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "dw": torch.nn.Conv2d(width, width, 3, padding=1, groups=width),
            "reduce": torch.nn.Conv2d(width, 4, 1), "expand": torch.nn.Conv2d(4, width, 1),
            "project": torch.nn.Conv2d(width, width, 1)}) for _ in range(2))

    def forward(self, x):
        h = self.stem(torch.nn.functional.pad(x, (0, 1, 0, 1)))
        for block in self.blocks:
            y = torch.nn.functional.silu(block["dw"](h))
            scale = torch.sigmoid(block["expand"](torch.nn.functional.silu(block["reduce"](y.mean((2, 3), keepdim=True)))))
            h = h + block["project"](y * scale)
        return h


def test_onnx_runtime_runs_every_convolution_of_silu_squeeze_excite_and_padded_blocks_in_int8(tmp_path):
    g = torch.Generator().manual_seed(0)
    qm = qcompile.compile(EfficientBlocks(), target="onnx-qdq", progress=False,
                          calibration_data=[(torch.randn(2, 3, 17, 17, generator=g),) for _ in range(4)])
    exported = qm.export_onnx(tmp_path / "blocks.onnx")
    assert exported.quantized_weight_ops == 9 and exported.unfused is None
    assert exported.check.int8_kernels["QLinearConv"] == 9 and exported.check.ort_ops.get("Pad") == 1
    # the first add's sum is read quantized by the second add (QLinearAdd); the second one's sum is
    # the model's float output, an Add of dequantized values
    assert exported.check.int8_kernels["QLinearAdd"] == 1 and exported.check.ort_ops["Add"] == 1
    x = torch.randn(2, 3, 17, 17, generator=g)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(1), EfficientBlocks()(x).flatten(1)).min() > 0.99
