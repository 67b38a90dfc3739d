"""correct-bias (passes/correct_bias.py): the mean output error of round-to-nearest weights taken out of the bias."""

import copy

import pytest
import torch
from qcompile.passes import Annotate, CorrectBias

import qcompile
from qcompile import OpQuantConfig, PerChannel, PerGroup, QConfig, QuantSpec
from qcompile.context import CompileContext
from qcompile.pass_manager import PassManager
from qcompile.report import node_outputs
from qcompile.targets import get_target
from qcompile.testing import assert_graph_diff
from tests.quant_stages import cleaned

CORRECTED = QuantSpec("int4", granularity=PerChannel(0), bias_correction=True)


class ConvThenLinear(torch.nn.Module):
    """Inputs with a large mean (as after a ReLU): where a rounding error becomes a bias."""

    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=bias)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10, bias=bias)
        self.eval()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def positive_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 3, 8, 8, generator=generator) * 2 + 0.5,) for _ in range(count)]


def run_pass(model, spec, data):
    """The annotated graph (uint8 activations, ``spec`` weights on conv and linear) and correct-bias run on it."""
    x = data[0][0]
    qconfig = QConfig(by_op={op: OpQuantConfig(QuantSpec("uint8", symmetric=False), spec) for op in ("conv2d", "linear")})
    before = Annotate(qconfig=qconfig)(cleaned(model, x)).graph_module
    context = CompileContext(get_target("cpu-int8"), ((x,), {}), calibration_data=data)
    return before, PassManager([CorrectBias()], context=context, initial_properties=frozenset({"annotated"}))(before)


def mean_error(gm, reference, data, node):
    """Per output channel, the mean over the data of ``node``'s output in ``gm`` minus in ``reference``."""
    errors = [node_outputs(gm, {node}, batch, {})[node] - node_outputs(reference, {node}, batch, {})[node]
              for batch in data]
    channel = 1 if errors[0].dim() == 4 else -1
    return torch.cat([e.movedim(channel, -1).reshape(-1, e.shape[channel]) for e in errors]).mean(0)


def test_the_graph_gets_rounded_weights_and_corrected_biases():
    data = positive_batches(4)
    before, result = run_pass(ConvThenLinear(), CORRECTED, data)
    after = result.graph_module
    assert result.records[0].stats == {"corrected": 2}
    assert_graph_diff(before, after, removed=[
        "constant conv.weight", "constant conv.bias", "constant fc.weight", "constant fc.bias",
        "%conv2d = aten.conv2d.default(%x, %conv_weight, %conv_bias, [2, 2], [1, 1])",
        "%linear = aten.linear.default(%flatten, %fc_weight, %fc_bias)",
    ], added=[
        "constant conv_weight_q : i8[8,3,3,3]", "constant conv_weight_scale : f32[8]",
        "constant conv_weight_zero_point : i32[8]",
        "%dequantize_default = qc.dequantize.default(%conv_weight_q, %conv_weight_scale, %conv_weight_zero_point, 0, "
        "torch.float32) : f32[8,3,3,3]",
        "constant conv2d_corrected_bias : f32[8]",
        "%conv2d = aten.conv2d.default(%x, %dequantize_default, %conv2d_corrected_bias, [2, 2], [1, 1]) : "
        "f32[s0,8,(((s1 - 1)//2)) + 1,(((s2 - 1)//2)) + 1]",
        "constant fc_weight_q : i8[10,128]", "constant fc_weight_scale : f32[10]",
        "constant fc_weight_zero_point : i32[10]",
        "%dequantize_default_1 = qc.dequantize.default(%fc_weight_q, %fc_weight_scale, %fc_weight_zero_point, 0, "
        "torch.float32) : f32[10,128]",
        "constant linear_corrected_bias : f32[10]",
        "%linear = aten.linear.default(%flatten, %dequantize_default_1, %linear_corrected_bias) : f32[s0,10]",
    ])


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(3 * 8 * 8, 16)
        self.eval()

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(("model", "node", "bias"), [(ConvThenLinear(), "conv2d", "conv.bias"),
                                                     (Linear(), "linear", "fc.bias")])
def test_the_mean_output_error_on_the_calibration_data_is_gone(model, node, bias):
    # exact for any op: δ is op(x, ΔW) itself (for the conv: stride 2, zero padding, borders included)
    data = positive_batches(4)
    before, result = run_pass(model, CORRECTED, data)
    corrected = result.graph_module
    uncorrected = copy.deepcopy(corrected)  # the same rounded weights with the bias as it was
    setattr(uncorrected, f"{node}_corrected_bias", model.get_parameter(bias).detach().clone())
    left, removed = mean_error(corrected, before, data, node), mean_error(uncorrected, before, data, node)
    assert float(removed.abs().max()) > 1e-2
    assert float(left.abs().max()) < 1e-3 * float(removed.abs().max()) + 1e-5


def test_an_op_without_bias_is_rounded_and_named():
    data = positive_batches(2)
    _, result = run_pass(ConvThenLinear(bias=False), CORRECTED, data)
    record = result.records[0]
    assert record.stats == {"corrected": 0}
    assert {str(d) for d in record.diagnostics} == {"conv2d: no bias to correct: rounded to nearest",
                                                   "linear: no bias to correct: rounded to nearest"}


def test_without_calibration_data_bias_correction_is_an_error_naming_the_node():
    x = positive_batches(1)[0][0]
    planned = Annotate(target="onnx-qdq", qconfig=QConfig(by_op={"conv2d": OpQuantConfig(
        QuantSpec("uint8", symmetric=False), QuantSpec("int8", granularity=PerChannel(0), bias_correction=True))}))(
        cleaned(ConvThenLinear(), x)).graph_module
    with pytest.raises(qcompile.NodeError, match="bias_correction, which reads calibration data.*'conv'"):
        CorrectBias()(planned)


def test_compile_with_bias_correction_is_closer_to_float_on_held_out_data():
    model = ConvThenLinear()
    data, held_out = positive_batches(8), torch.cat([b[0] for b in positive_batches(4, seed=1)])
    errors = {}
    for correct in (False, True):
        spec = QuantSpec("int4", granularity=PerGroup(1, 32), bias_correction=correct)
        qm = qcompile.compile(model, data[0], calibration_data=data, progress=False,
                              qconfig=QConfig(by_op={"linear": OpQuantConfig(None, spec)}))
        errors[correct] = float((qm(held_out) - model(held_out)).mean(0).abs().mean())
    assert errors[True] < 0.5 * errors[False]
