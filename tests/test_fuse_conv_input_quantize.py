"""fuse-conv-input-quantize (qcompile/targets/cpu_int8/fuse_conv_input_quantize.py) and conv2d_int8 on
float activations, which it quantizes straight into channels-last bytes (native quantize_channels_last)."""

import pytest
import torch

import qcompile
from qcompile import native
from qcompile.targets.cpu_int8 import FuseConvInputQuantize
from qcompile.targets.cpu_int8.onednn import Int8KernelCall
from qcompile.testing import assert_graph_diff, assert_pass_contract
from tests.models import TinyConvNet

qc = torch.ops.qc


class ImageConv(torch.nn.Module):
    """An image quantized and convolved as lower-cpu-int8 writes it. ``shared``: the integers are
    also an output; ``narrow``: quantized to [0, 127]; ``other_scale``: the convolution is given
    another scale than the quantize used (else an equal one, a constant of its own). None of
    those is fused."""

    def __init__(self, shared: bool = False, narrow: bool = False, other_scale: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("scale", torch.tensor(0.03))
        self.register_buffer("conv_scale", torch.tensor(0.04 if other_scale else 0.03))
        self.register_buffer("zero_point", torch.tensor(117))
        self.register_buffer("weight", torch.randint(-60, 60, (8, 3, 3, 3), dtype=torch.int8, generator=g))
        self.register_buffer("weight_scale", torch.rand(8, generator=g) * 0.01)
        self.register_buffer("bias", torch.randn(8, generator=g))
        self.shared, self.qmax = shared, 127 if narrow else 255

    def forward(self, x):
        q = qc.quantize(x, self.scale, self.zero_point, None, 0, self.qmax, torch.uint8)
        y = qc.conv2d_int8(q, self.conv_scale, self.zero_point, self.weight, self.weight_scale, self.bias, None, 1.0,
                           0, [2, 2], [1, 1], [1, 1], 1, 0.05, 3, torch.uint8, "relu")
        return (y, q) if self.shared else y


def test_the_convolution_reads_the_float_image_and_gives_the_same_bits():
    x = torch.randn(2, 3, 16, 16) * 2
    before = qcompile.capture(ImageConv(), (x,))
    after = assert_pass_contract(FuseConvInputQuantize(), before, [x])
    assert FuseConvInputQuantize()(before).stats == {"fused": 1}
    assert_graph_diff(before, after, removed=[
        "%quantize = qc.quantize.default(%x, %scale, %zero_point, None, 0, 255, torch.uint8)",
        "%conv2d_int8 = qc.conv2d_int8.default(%quantize, ",
    ], added=["%conv2d_int8 = qc.conv2d_int8.default(%x, %conv_scale, %zero_point, "], exact=False)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16) * 2
        with torch.no_grad():
            assert torch.equal(after(x), before(x))


@pytest.mark.parametrize("model", [ImageConv(shared=True), ImageConv(narrow=True), ImageConv(other_scale=True)],
                         ids=["integers-read-elsewhere", "narrow-range", "other-scale"])
def test_a_quantize_the_convolution_cannot_take_over_is_left_alone(model):
    result = FuseConvInputQuantize()(qcompile.capture(model, (torch.randn(2, 3, 16, 16),)))
    assert not result.modified and result.stats == {}


@pytest.mark.parametrize("isa", native.available_isas())
@pytest.mark.parametrize("shape, layout, dtype", [
    ((8, 3, 224, 224), torch.contiguous_format, torch.float32),  # ResNet's image batch, split across threads
    ((2, 1, 5, 7), torch.contiguous_format, torch.float32), ((3, 4, 9, 11), torch.contiguous_format, torch.bfloat16),
    ((2, 16, 6, 6), torch.contiguous_format, torch.float32), ((2, 3, 6, 6), torch.channels_last, torch.float32)])
def test_native_quantize_channels_last_is_qc_quantize_in_channels_last_order(isa, shape, layout, dtype):
    x = (torch.randn(shape) * 3).to(dtype).contiguous(memory_format=layout)
    x[0, 0, 0, :2] = torch.tensor([1e6, -1e6])  # saturates both ends
    expected = qc.quantize(x, torch.tensor(0.03), torch.tensor(117), None, 0, 255, torch.uint8)
    with native.running_on(isa):
        actual = native._native.quantize_channels_last(x, 0.03, 117)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(actual, expected)


def test_a_compiled_cnn_quantizes_its_image_in_the_first_convolution(monkeypatch):
    model = TinyConvNet()
    data = [(torch.randn(4, 1, 8, 8),) for _ in range(3)]
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    first = Int8KernelCall.of(next(n for n in qm.graph_module.graph.nodes if n.op == "call_function"))
    assert first is not None and first.kernel == "conv2d_int8" and first.x.op == "placeholder"
    monkeypatch.setenv("QCOMPILE_SKIP_PASSES", "fuse-conv-input-quantize")
    unfused = qcompile.compile(model, calibration_data=data, progress=False)
    assert any(n.target == qc.quantize.default for n in unfused.graph_module.graph.nodes)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(qm(x), unfused(x))
