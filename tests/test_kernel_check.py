"""Kernels honour their layout contracts and are held to their Q/DQ reference at compile time."""


import pytest
import torch
from torch import nn

import qcompile
from qcompile.kernel_check import KernelMismatchError, check_kernels, difference, register_kernel
from qcompile.targets.cpu_int8.capabilities import KERNEL_WEIGHT
from qcompile.targets.cpu_int8.onednn import reference_conv2d_int8, reference_linear_int8
from qcompile.targets.cpu_int8.uint8_kernels import reference_max_pool2d_uint8

G = torch.Generator().manual_seed(0)


def uint8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=G)


def int8_weight(*shape):
    """Weights over the whole range the int8 kernels take on this CPU (7 bits without VNNI)."""
    return torch.randint(-KERNEL_WEIGHT.qmax, KERNEL_WEIGHT.qmax + 1, shape, dtype=torch.int8, generator=G)


def linear_args(x, other=None, out_dtype=torch.float32):
    weight = int8_weight(24, x.shape[-1])
    return (x, torch.tensor([0.02]), torch.tensor([128]), weight, torch.rand(24, generator=G) / 100 + 1e-3,
            torch.randn(24, generator=G), other, 0.05, 100, out_dtype, "relu")


def assert_within_contract(kernel, reference, *args):
    first, second = kernel(*args), kernel(*args)
    assert torch.equal(first, second), "the kernel must give the same answer on every call"
    error, allowed = difference(first, reference(*args))
    assert error <= allowed, (error, allowed)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "dense"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_linear_int8_reads_strided_inputs_and_residuals_by_their_strides(layout, out_dtype):
    if layout == "transposed":
        x, other = uint8(3, 40, 16).transpose(1, 2), torch.randn(3, 24, 16, generator=G).transpose(1, 2)
    elif layout == "sliced":
        x, other = uint8(3, 16, 80)[..., ::2], torch.randn(3, 16, 48, generator=G)[..., 24:]
    else:
        x, other = uint8(3, 16, 40), torch.randn(3, 16, 24, generator=G)
    assert_within_contract(torch.ops.qc.linear_int8, reference_linear_int8, *linear_args(x, other, out_dtype))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "dense"])
def test_conv2d_int8_takes_any_input_layout_and_a_uint8_residual(layout):
    x = uint8(2, 8, 12, 12)
    other = uint8(2, 16, 10, 10)
    if layout == "channels_last":
        x, other = x.contiguous(memory_format=torch.channels_last), other.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, other = uint8(2, 16, 12, 12)[:, ::2], uint8(2, 16, 10, 20)[..., ::2]
    weight = int8_weight(16, 8, 3, 3)
    args = (x, torch.tensor(0.02), torch.tensor(128), weight, torch.rand(16, generator=G) / 100 + 1e-3,
            torch.randn(16, generator=G), other, 0.03, 120, [1, 1], [0, 0], [1, 1], 1, 0.05, 10, torch.uint8, "relu")
    assert_within_contract(torch.ops.qc.conv2d_int8, reference_conv2d_int8, *args)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_uint8_max_pool_is_exact_in_any_layout(layout):
    x = uint8(2, 4, 15, 15)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else uint8(2, 8, 15, 15)[:, 1::2]
    out = torch.ops.qc.max_pool2d_uint8(x, [3, 3], [2, 2], [1, 1])
    assert torch.equal(out, reference_max_pool2d_uint8(x, [3, 3], [2, 2], [1, 1]))


@torch.library.custom_op("qctest::add_one_or_four", mutates_args=())
def add_one_or_four(x: torch.Tensor) -> torch.Tensor:
    """A kernel that breaks its contract (adds 4 steps where the reference adds 1) on purpose."""
    return (x.int() + 4).clamp(0, 255).to(torch.uint8)


@add_one_or_four.register_fake
def _(x):
    return torch.empty_like(x)


register_kernel(add_one_or_four, lambda x: (x.int() + 1).clamp(0, 255).to(torch.uint8))


def test_a_kernel_outside_its_contract_is_an_error_naming_node_and_difference():
    class UsesBrokenKernel(nn.Module):
        def forward(self, x):
            return torch.ops.qctest.add_one_or_four(x)

    gm = qcompile.capture(UsesBrokenKernel(), (uint8(2, 8),))
    with pytest.raises(KernelMismatchError, match=r"add_one_or_four.*on batch 7: 3 steps \(allowed 2\)"):
        check_kernels(gm, [("on batch 7", (uint8(2, 8),), {})])


class TransposedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        t = x.transpose(1, 2)
        return t + self.fc(t)


class FlattenWithView(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        return self.fc(y.view(y.shape[0], -1))


def calibration(shape, count=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=g),) for _ in range(count)]


def test_linear_int8_refuses_a_float_residual_into_a_uint8_output():
    with pytest.raises(ValueError, match="float output only"):
        torch.ops.qc.linear_int8(*linear_args(uint8(2, 16), torch.randn(2, 24), torch.uint8))


class ResidualThenRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) + x))


def test_a_linear_with_a_residual_feeding_an_int8_linear_writes_float_not_truncated_bytes():
    model, data = ResidualThenRelu().eval(), calibration((4, 16))
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    x = data[0][0]
    assert torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.999
    first = next(n for n in qm.graph_module.graph.nodes if n.target == torch.ops.qc.linear_int8.default)
    assert first.args[9] == torch.float32


def test_a_residual_read_through_a_transposed_view_gives_the_float_answer():
    model, data = TransposedResidual().eval(), calibration((4, 16, 12))
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    x = data[0][0]
    first, second = qm(x), qm(x)
    assert torch.equal(first, second)
    assert torch.nn.functional.cosine_similarity(first.flatten(), model(x).flatten(), dim=0) > 0.999
    assert qm.report.kernel_calls_checked >= 1


def test_a_view_after_a_channels_last_kernel_runs_as_a_reshape():
    model, data = FlattenWithView().eval(), calibration((4, 3, 8, 8))
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(qm(x), model(x), rtol=0.1, atol=0.1)
    relaxed = next(p for p in qm.report.passes if p.name == "relax-views")
    assert relaxed.stats == {"relaxed": 1}


def test_verify_mode_checks_the_kernels_on_every_calibration_batch():
    data = calibration((4, 3, 8, 8), count=3)
    plain = qcompile.compile(FlattenWithView().eval(), calibration_data=data, progress=False)
    verified = qcompile.compile(FlattenWithView().eval(), calibration_data=data, progress=False, verify=True)
    assert verified.report.kernel_calls_checked == 4 * plain.report.kernel_calls_checked


def test_distilbert_whose_attention_output_a_view_reads_runs_after_compile():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=500, dim=64, n_layers=2, n_heads=4, hidden_dim=128)).eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 16, dtype=torch.long)
    data = [{"input_ids": torch.randint(0, 500, (4, 16), generator=g), "attention_mask": mask} for _ in range(3)]
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    with torch.no_grad():
        out, ref = (m(**data[0]).last_hidden_state for m in (qm, model))
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
