"""FP8 QDQ export: float8 initializers and Q/DQ (opset 21), the full checker, ONNX Runtime's
cross-check in float8 codes, and the summary's note that ONNX Runtime's CPU provider runs it unfused."""

import onnx
import pytest
import torch
from onnxscript import opset21 as op

import qcompile
from qcompile.qconfig import fp8_qconfig
from qcompile.qdq import QUANTIZE
from qcompile.targets.onnx_qdq import check as onnx_check
from qcompile.targets.onnx_qdq import export as onnx_export
from tests.models import TinyBlock, TinyConvNet


def batches(shape, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(count)]


@pytest.mark.filterwarnings("ignore:2 nodes read float8_e5m2")
@pytest.mark.parametrize("dtype, element_type", [("float8_e4m3fn", onnx.TensorProto.FLOAT8E4M3FN),
                                                 ("float8_e5m2", onnx.TensorProto.FLOAT8E5M2)])
def test_fp8_weights_are_float8_initializers_and_the_file_checks(tmp_path, dtype, element_type):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), target="onnx-qdq",
                          qconfig=fp8_qconfig(dtype), progress=False)
    result = qm.export_onnx(tmp_path / "fp8.onnx")
    model = onnx.load(result.path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 19  # float8 QuantizeLinear/DequantizeLinear
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    matmuls = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(matmuls) == 2
    for node in matmuls:
        weight = producers[node.input[1]]
        while weight.op_type != "DequantizeLinear":  # a Transpose may sit between
            weight = producers[weight.input[0]]
        assert initializers[weight.input[0]].data_type == element_type
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(initializers[n.input[2]].data_type == element_type for n in activation_q
                                if n.input[2] in initializers)
    check = result.check
    assert check.worst.max_steps <= 1  # in float8 codes: ONNX Runtime casts exactly as qc.quantize does
    assert "ONNX Runtime's CPU provider runs FP8 QuantizeLinear/DequantizeLinear unfused" in str(result)
    assert result.float8_weight_ops == 2 and result.unfused is None


def test_fp8_convolutions_export_and_cross_check(tmp_path):
    qconfig = fp8_qconfig().set_op("conv2d", fp8_qconfig().by_op["linear"])
    qm = qcompile.compile(TinyConvNet(), calibration_data=batches((4, 1, 8, 8)), target="onnx-qdq", qconfig=qconfig,
                          progress=False)
    result = qm.export_onnx(tmp_path / "conv.onnx")
    assert result.float8_weight_ops == 3 and result.check.worst.max_steps <= 1


def test_cross_check_counts_float8_codes_and_names_a_wrong_cast(tmp_path, monkeypatch):
    def quantize_at_twice_the_scale(x, scale, zero_point, axis, qmin, qmax, dtype):
        return onnx_export._quantize_linear(x, op.Mul(scale, op.Constant(value_float=2.0)), zero_point, axis, qmin,
                                            qmax, dtype)

    monkeypatch.setitem(onnx_export.TRANSLATIONS, QUANTIZE, quantize_at_twice_the_scale)
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), target="onnx-qdq", qconfig=fp8_qconfig(),
                          progress=False)
    with pytest.raises(qcompile.QCompileError, match=r"diverge at quantized tensor 'quantize': \d+ steps"):
        qm.export_onnx(tmp_path / "wrong.onnx")


def test_float8_distance_is_in_codes():
    values = torch.tensor([1.0, 1.125, 1.25, -1.0, -1.125, 0.0, 448.0, -448.0]).to(torch.float8_e4m3fn)
    codes = onnx_check._signed_codes(values)
    # neighbouring values are one code apart, on both sides of zero
    assert codes[1] - codes[0] == 1 and codes[2] - codes[1] == 1 and codes[3] - codes[4] == 1
    assert codes[6] == 126 and codes[7] == -126 and codes[5] == 0


def test_dynamic_per_token_fp8_has_no_onnx_translation(tmp_path):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), target="onnx-qdq",
                          qconfig=fp8_qconfig(activations="per-token"), progress=False)
    assert all(n.precision == "float" for n in qm.report.nodes)  # onnx-qdq has per-tensor FP8 activations only
