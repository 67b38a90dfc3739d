"""conv1d-as-conv2d: 1-D convolutions run as 2-D ones over a height of 1, exactly, and then as int8
kernels (cpu-int8) and QLinearConv (ONNX Runtime)."""

import pytest
import torch

import qcompile
from qcompile.ir.parser import parse_graph
from qcompile.passes.conv1d_as_conv2d import Conv1dAsConv2d
from qcompile.testing import assert_pass_contract, assert_rewrites


def test_a_conv1d_becomes_a_conv2d_of_height_one_and_its_relu_moves_inside_the_squeeze():
    out = assert_rewrites(Conv1dAsConv2d(), """
        %x = input x : f32[2,4,16]
        %w = constant conv.weight : f32[8,2,3]
        %b = constant conv.bias : f32[8]
        %y = aten.conv1d.default(%x, %w, %b, [2], [1], [3], 2) : f32[2,8,6]
        %r = aten.relu.default(%y) : f32[2,8,6]
        return (%r,)
    """, """
        %x = input x : f32[2,4,16]
        %unsqueeze_default = aten.unsqueeze.default(%x, -2) : f32[2,4,1,16]
        %y_weight = constant y_weight : f32[8,2,1,3]
        %b = constant conv.bias : f32[8]
        %conv2d_default = aten.conv2d.default(%unsqueeze_default, %y_weight, %b, [1, 2], [0, 1], [1, 3], 2) : f32[2,8,1,6]
        %relu_default = aten.relu.default(%conv2d_default) : f32[2,8,1,6]
        %squeeze_dim_1 = aten.squeeze.dim(%relu_default, -2) : f32[2,8,6]
        %w = constant conv.weight : f32[8,2,3]
        return (%squeeze_dim_1,)
    """)
    assert torch.equal(out.y_weight[:, :, 0], out.conv.weight)  # the model's tensor is left as it was


def test_a_stack_of_conv1d_stays_one_4d_chain_and_a_second_reader_gets_the_squeezed_value():
    gm = parse_graph("""
        %x = input x : f32[2,4,16]
        %w1 = constant c1.weight : f32[8,4,5]
        %y1 = aten.conv1d.default(%x, %w1, None, [1], [2]) : f32[2,8,16]
        %r1 = aten.gelu.default(%y1) : f32[2,8,16]
        %w2 = constant c2.weight : f32[8,8,3]
        %y2 = aten.conv1d.default(%r1, %w2, None, [1], [1]) : f32[2,8,16]
        %s = aten.add.Tensor(%y2, %r1) : f32[2,8,16]
        return (%s,)
    """)
    out = assert_pass_contract(Conv1dAsConv2d(), gm)
    ops = [str(n.target) for n in out.graph.nodes if n.op == "call_function"]
    assert ops == ["aten.unsqueeze.default", "aten.conv2d.default", "aten.gelu.default", "aten.squeeze.dim",
                   "aten.conv2d.default", "aten.squeeze.dim", "aten.add.Tensor"]
    convs = [n for n in out.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert convs[1].args[0].target == torch.ops.aten.gelu.default  # the 4-D GELU, no squeeze/unsqueeze between


def test_unbatched_and_computed_weights():
    gm = parse_graph("""
        %x = input x : f32[4,16]
        %w = constant conv.weight : f32[8,4,3]
        %y = aten.conv1d.default(%x, %w) : f32[8,14]
        %v = input v : f32[8,8,1]
        %z = aten.conv1d.default(%y, %v) : f32[8,14]
        return (%z,)
    """)
    out = assert_pass_contract(Conv1dAsConv2d(), gm)
    ops = [str(n.target) for n in out.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.conv2d.default") == 1 and ops.count("aten.conv1d.default") == 1  # an input weight stays


class AudioNet(torch.nn.Module):
    """An audio front end: conv1d -> BatchNorm1d -> ReLU twice, pooled, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(4, 32, 5, padding=2)
        self.bn1 = torch.nn.BatchNorm1d(32)
        self.conv2 = torch.nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(32, 6)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(-1))


@pytest.fixture(scope="module")
def audio():
    torch.manual_seed(0)
    model = AudioNet().eval()
    model.bn1.running_mean.uniform_(-0.2, 0.2)
    model.bn1.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(8, 4, 64, generator=g),) for _ in range(4)]


def test_conv1d_models_run_on_the_int8_convolution_kernels(audio):
    model, batches = audio
    qm = qcompile.compile(model, calibration_data=batches, progress=False)
    assert [n.detail.split(" ")[0] for n in qm.report.nodes] == ["qc.conv2d_int8+relu", "qc.conv2d_int8+relu",
                                                                 "qc.linear_int8"]
    x = torch.randn(3, 4, 40)  # another batch and length
    with torch.no_grad():
        expected, actual = model(x), qm(x)
    assert torch.nn.functional.cosine_similarity(actual, expected).min() > 0.99


def test_conv1d_models_export_to_onnx_runtime_int8_convolutions(audio, tmp_path):
    model, batches = audio
    qm = qcompile.compile(model, target="onnx-qdq", calibration_data=batches, progress=False)
    result = qm.export_onnx(tmp_path / "audio.onnx")
    # Both are QLinearConvs: the second one's output, which a float mean reads, is quantized after
    # its ReLU, since ONNX Runtime fuses a QDQ convolution only into a quantize.
    assert result.check.int8_kernels == {"QLinearConv": 2, "QGemm": 1} and result.unfused is None
    assert result.check.worst.max_steps <= 1


def test_a_batchnorm_after_the_conv1d_moves_inside_the_squeeze_with_its_relu():
    # (QAT's is a training BatchNorm: the same rewrite; eval here, so running it changes no statistics)
    gm = parse_graph("""
        %x = input x : f32[4,2,16]
        %w = constant conv.weight : f32[6,2,3]
        %y = aten.conv1d.default(%x, %w, None, [1], [1]) : f32[4,6,16]
        %g = constant bn.weight : f32[6]
        %b = constant bn.bias : f32[6]
        %m = constant bn.running_mean : f32[6]
        %v = constant bn.running_var : f32[6]
        %n = aten.batch_norm.default(%y, %g, %b, %m, %v, False, 0.1, 1e-05, False) : f32[4,6,16]
        %r = aten.relu.default(%n) : f32[4,6,16]
        return (%r,)
    """, constants={"bn.running_var": torch.rand(6) + 0.5})
    out = assert_pass_contract(Conv1dAsConv2d(), gm, (torch.randn(4, 2, 16),))
    ops = [str(n.target) for n in out.graph.nodes if n.op == "call_function"]
    assert ops == ["aten.unsqueeze.default", "aten.conv2d.default", "aten.batch_norm.default", "aten.relu.default",
                   "aten.squeeze.dim"]
