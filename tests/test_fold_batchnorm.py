"""fold-batchnorm: W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""

import pytest
import torch
from qcompile.passes import Canonicalize, FoldBatchNorm
from torch import nn

import qcompile
from qcompile.testing import (
    assert_graph_diff,
    assert_outputs_close,
    assert_pass_contract,
)


class ConvBN(nn.Module):
    def __init__(self, bias=False, affine=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=bias)
        self.bn = nn.BatchNorm2d(3, affine=affine)

    def forward(self, x):
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def with_stats(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.25, 4)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 2)
                nn.init.uniform_(m.bias, -1, 1)
    return model.eval()


def test_hand_worked_example():
    # One channel: W = 2, no bias, mean = 1, var = 3, eps = 1, gamma = 4, beta = 0.5
    # std = sqrt(3 + 1) = 2, scale = 4 / 2 = 2  ->  W' = 2 * 2 = 4, b' = (0 - 1) * 2 + 0.5 = -1.5
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1, eps=1.0)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_mean.fill_(1.0)
        model[1].running_var.fill_(3.0)
        model[1].weight.fill_(4.0)
        model[1].bias.fill_(0.5)
    gm = qcompile.capture(model, (torch.ones(2, 1, 1, 1),))
    out = FoldBatchNorm()(gm).graph_module
    assert out.conv2d_folded_weight.flatten().tolist() == [4.0]
    assert out.conv2d_folded_bias.tolist() == [-1.5]
    assert out(torch.full((2, 1, 1, 1), 3.0)).flatten().tolist() == [10.5, 10.5]  # 4 * 3 - 1.5


def test_structure_conv():
    gm = qcompile.capture(with_stats(ConvBN()), (torch.randn(2, 2, 4, 4),))
    out = FoldBatchNorm()(gm).graph_module
    assert_graph_diff(
        gm,
        out,
        removed=[
            "%conv_weight = constant conv.weight",
            "%conv2d = aten.conv2d.default(%x, %conv_weight) : f32[s0,3,s1,s2]",
            "%bn_weight = constant bn.weight",
            "%bn_bias = constant bn.bias",
            "%bn_running_mean = constant",
            "%bn_running_var = constant",
            "%batch_norm = aten.batch_norm.default(%conv2d,",
            "return (%batch_norm,)",
        ],
        added=[
            "%conv2d_folded_weight = constant conv2d_folded_weight : f32[3,2,1,1]",
            "%conv2d_folded_bias = constant conv2d_folded_bias : f32[3]",
            "%conv2d = aten.conv2d.default(%x, %conv2d_folded_weight, %conv2d_folded_bias)",
            "return (%conv2d,)",
        ],
    )


@pytest.mark.parametrize(
    "model, shape",
    [
        (ConvBN(bias=False), (2, 2, 5, 5)),
        (ConvBN(bias=True), (2, 2, 5, 5)),
        (ConvBN(affine=False), (2, 2, 5, 5)),
        (LinearBN(), (6, 4)),
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)), (2, 2, 7)),
        (nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3)), (2, 2, 3, 3, 3)),
    ],
)
def test_numerics_and_contract(model, shape):
    model = with_stats(model)
    x = torch.randn(*shape)
    gm = qcompile.capture(model, (x,))
    out = assert_pass_contract(FoldBatchNorm(), gm, example_args=(x,))
    assert "batch_norm" not in qcompile.print_graph(out)
    assert_outputs_close(model, out, (x,), rtol=1e-5)


def test_originals_untouched():
    model = with_stats(ConvBN(bias=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    FoldBatchNorm()(qcompile.capture(model, (torch.randn(2, 2, 3, 3),)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_training_mode_batchnorm_is_not_folded():
    model = with_stats(ConvBN()).train()
    gm = qcompile.capture(model, (torch.randn(2, 2, 3, 3),))
    with qcompile.trace_rules() as tracer:
        result = FoldBatchNorm()(gm)
    assert not result.modified
    assert "BatchNorm runs in training mode" in tracer.explain("batch_norm")


def test_conv_output_used_elsewhere_is_not_folded():
    gm = qcompile.capture(with_stats(ConvUsedTwice()), (torch.randn(2, 2, 3, 3),))
    with qcompile.trace_rules() as tracer:
        assert not FoldBatchNorm()(gm).modified
    assert "intermediate value 'conv2d' is also used by add" in tracer.explain("batch_norm")


def test_linear_with_3d_output_is_not_folded():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)  # normalizes dim 1: the sequence, not the features

        def forward(self, x):
            return self.bn(self.fc(x))

    gm = qcompile.capture(with_stats(Seq()), (torch.randn(2, 4, 4),))
    with qcompile.trace_rules() as tracer:
        assert not FoldBatchNorm()(gm).modified
    assert "linear output is 3-D" in tracer.explain("batch_norm")


def test_resnet18_within_1e5_after_canonicalize_and_fold(resnet, image_batch):
    gm = qcompile.capture(resnet, (image_batch,))
    result = qcompile.PassManager(
        [Canonicalize(), FoldBatchNorm()], [qcompile.NumericCheck((image_batch,), rtol=1e-5)], verify=True
    )(gm)
    assert result.records[1].stats == {"conv2d-batchnorm": 20}
    assert assert_outputs_close(resnet, result.graph_module, (image_batch,), rtol=1e-5) < 1e-5
