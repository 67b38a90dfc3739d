"""QAT: training-ops, insert-fake-quant and lower-qat as graph rewrites; prepare_qat / convert_qat /
Distillation / fit as a user meets them; the digits CNN trained at W4A8 end to end."""

import copy
import math
import warnings

import pytest
import torch
from qcompile.passes.insert_fake_quant import InsertFakeQuant
from qcompile.passes.lower_qat import LowerQat
from qcompile.passes.training_ops import TrainingOps
from torch import nn

import qcompile
from qcompile import OpQuantConfig, PerGroup, QuantSpec
from qcompile.capture import train_mode
from qcompile.context import CompileContext
from qcompile.errors import QCompileError
from qcompile.ir.graph import constant_value, copy_graph_module
from qcompile.pipeline import Pipeline
from qcompile.qdq import quantized_weight
from qcompile.qat import QAT_PREPARE, fit, learnable, lr_factor
from qcompile.targets import get_target
from qcompile.testing import assert_graph_diff, assert_pass_contract, check_graph


class ConvBNNet(nn.Module):
    def __init__(self, dropout: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _batches(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 4, 4, generator=generator),) for _ in range(count)]


def _prepared_until(model, last: str, qconfig=None, batches=None):
    """The QAT prepare pipeline up to (not including) the pass ``last``, as prepare_qat runs it."""
    batches = batches or _batches()
    x = batches[0][0]
    with train_mode(model):
        gm = copy_graph_module(qcompile.capture(model, (x,)))
    gm.eval()
    target = get_target("cpu-int8")
    context = CompileContext(target, ((x,), {}), qconfig=learnable(qconfig or target.preset()),
                             calibration_data=batches, outlier_smoothing=None)
    names = QAT_PREPARE.split(",")
    return context.run_stage("prepare", Pipeline.parse(",".join(names[:names.index(last)])), gm)


# --- training-ops ---------------------------------------------------------------------------

def test_training_ops_make_batchnorm_and_dropout_follow_the_graph_mode():
    model = ConvBNNet().train()
    gm = _prepared_until(model, "training-ops")
    out = assert_pass_contract(TrainingOps(), gm)
    assert_graph_diff(gm, out, added=[
        "%bn_mode_0 = module[bn_mode_0](input=%conv2d, weight=%bn_weight, bias=%bn_bias, running_mean=%bn_running_mean, "
        "running_var=%bn_running_var, momentum=0.1, eps=1e-05, cudnn_enabled=False)",
        "%relu = aten.relu.default(%bn_mode_0)",
        "%dropout_mode_0 = module[dropout_mode_0](input=%relu, p=0.5)",
        "%flatten = aten.flatten.using_ints(%dropout_mode_0, 1)",
    ], removed=[
        "%batch_norm = aten.batch_norm.default(%conv2d, %bn_weight, %bn_bias, %bn_running_mean, %bn_running_var, True,",
        "%relu = aten.relu.default(%batch_norm)",
        "%dropout = aten.dropout.default(%relu, 0.5, True)",
        "%flatten = aten.flatten.using_ints(%dropout, 1)",
    ])
    x = _batches(1)[0][0]
    out.eval()
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(out(x), reference(x))  # eval: running statistics, no dropout
    out.train()
    torch.manual_seed(3)
    first = out(x)
    torch.manual_seed(4)
    assert not torch.equal(first, out(x)), "dropout is active in training mode"


def test_a_frozen_batchnorm_keeps_its_running_statistics_while_training():
    gm = TrainingOps()(_prepared_until(ConvBNNet(dropout=0.0).train(), "training-ops")).graph_module
    gm.train()
    x = _batches(1)[0][0]
    mean = gm.bn.running_mean.clone()
    gm(x)
    assert not torch.equal(gm.bn.running_mean, mean), "training mode updates the running mean"
    gm.bn_mode_0.freeze()
    mean = gm.bn.running_mean.clone()
    gm(x)
    assert torch.equal(gm.bn.running_mean, mean)


# --- insert-fake-quant ----------------------------------------------------------------------

def test_insert_fake_quant_replaces_observers_and_trains_the_conv_in_its_folded_form():
    gm = _prepared_until(ConvBNNet().train(), "insert-fake-quant")
    out = assert_pass_contract(InsertFakeQuant(), gm)
    assert_graph_diff(gm, out, added=[
        "%observer_0 = module[fq_act_0](%x)",
        "%add_tensor = aten.add.Tensor(%bn_running_var, 1e-05)",
        "%sqrt_default = aten.sqrt.default(%add_tensor)",
        "%div_tensor = aten.div.Tensor(%bn_weight, %sqrt_default)",
        "%view_default = aten.view.default(%div_tensor, [-1, 1, 1, 1])",
        "%mul_tensor = aten.mul.Tensor(%conv_weight, %view_default)",
        "%fq_weight_0 = module[fq_weight_0](%mul_tensor)",
        "%conv2d = aten.conv2d.default(%observer_0, %fq_weight_0, None, [1, 1], [1, 1])",
        "%view_default_1 = aten.view.default(%div_tensor, [1, -1, 1, 1])",
        "%div_tensor_1 = aten.div.Tensor(%conv2d, %view_default_1)",
        "%view_default_2 = aten.view.default(%conv_bias, [1, -1, 1, 1])",
        "%add_tensor_1 = aten.add.Tensor(%div_tensor_1, %view_default_2)",
        "%bn_mode_0 = module[bn_mode_0](input=%add_tensor_1,",
        "%observer_1 = module[fq_act_1](%dropout_mode_0)",
        "%fq_weight_1 = module[fq_weight_1](%fc_weight)",
        "%fq_act_1_log_scale = constant fq_act_1.log_scale",
        "%fq_weight_1_log_scale = constant fq_weight_1.log_scale",
        "%fq_bias_0 = module[fq_bias_0](%fc_bias, %fq_act_1_log_scale, %fq_weight_1_log_scale)",
        "%linear = aten.linear.default(%flatten, %fq_weight_1, %fq_bias_0)",
    ], removed=[
        "%observer_0 = module[observer_0](%x)",
        "%conv2d = aten.conv2d.default(%observer_0, %conv_weight, %conv_bias,",
        "%bn_mode_0 = module[bn_mode_0](input=%conv2d,",
        "%observer_1 = module[observer_1](%dropout_mode_0)",
        "%linear = aten.linear.default(%flatten, %fc_weight, %fc_bias)",
    ], exact=False)
    observer = gm.get_submodule("observer_0")
    fake = out.get_submodule("fq_act_0")
    scale, zero_point = observer.qparams()
    assert torch.allclose(fake.scale.detach(), scale.reshape(1), rtol=1e-6) and torch.equal(fake.zero_point.detach(), zero_point.float().reshape(1))
    assert fake.log_scale.requires_grad and not fake.zero_point.requires_grad


def test_the_folded_form_trains_the_same_function_as_the_float_model():
    """With fake quantization off, bn(conv(x, W·s)/s + b) in training mode is the model's own
    conv -> BN: same output and same weight gradient, to float rounding (checked in float64)."""
    model = ConvBNNet(dropout=0.0).train()
    qat = qcompile.prepare_qat(model, calibration_data=_batches(), progress=False, outlier_smoothing=None)
    assert qat.report.passes[-1].stats["batchnorm"] == 1
    qat.enable_fake_quant(False).double().train()
    x = _batches(1, seed=7)[0][0].double()
    reference = copy.deepcopy(model).double().train()
    reference(x).square().sum().backward()
    qat(x).square().sum().backward()
    torch.testing.assert_close(qat.graph_module.conv.weight.grad, reference.conv.weight.grad)
    torch.testing.assert_close(qat.graph_module.bn.weight.grad, reference.bn.weight.grad)
    # and the gradient the graph computes is the finite-difference one
    torch.autograd.gradcheck(lambda t: qat(t), (x[:2].clone().requires_grad_(),))


# --- lower-qat ------------------------------------------------------------------------------

def test_lower_qat_folds_batchnorm_and_makes_learned_scales_the_qdq_constants():
    fq = InsertFakeQuant()(_prepared_until(ConvBNNet().train(), "insert-fake-quant")).graph_module
    with torch.no_grad():
        fq.fq_act_1.log_scale.add_(math.log(1.25))  # as if trained
    out = assert_pass_contract(LowerQat(), fq)
    assert_graph_diff(fq, out, added=[
        "%quantize_default = qc.quantize.default(%x, %x_scale, %x_zero_point, None, 0, 255, torch.uint8)",
        "%conv2d_weight_q = constant conv2d_weight_q : i8[3,2,3,3]",
        "%conv2d_folded_bias_q = constant conv2d_folded_bias_q : i32[3]",
        "%conv2d = aten.conv2d.default(%dequantize_default, %dequantize_default_1, %dequantize_default_4,",
        "%relu = aten.relu.default(%conv2d)",
        "%fc_weight_q = constant fc_weight_q : i8[5,48]",
        "%fc_bias_q = constant fc_bias_q : i32[5]",
    ], removed=[
        "%bn_mode_0 = module[bn_mode_0]",
        "%dropout_mode_0 = module[dropout_mode_0]",
        "%fq_weight_0 = module[fq_weight_0](%mul_tensor)",
        "%add_ = aten.add_.Tensor(%bn_num_batches_tracked, 1)",
    ], exact=False)
    assert torch.equal(out.relu_scale, fq.fq_act_1.scale.detach())
    x = _batches(1, seed=5)[0][0]
    fq.eval()
    with torch.no_grad():
        expected, actual = fq(x), out(x)
    # the conv's int8 output moves by at most one step of the next quantizer, which the linear
    # spreads over its input: |Δy| ≤ S_relu · max_row ‖W_fc‖₁
    bound = float(out.relu_scale) * float(fq.fc.weight.abs().sum(1).max())
    assert (actual - expected).abs().max() <= bound
    assert (actual - expected).abs().max() < 1e-2 * expected.abs().max()


# --- prepare_qat / convert_qat --------------------------------------------------------------

def test_qat_trains_and_lowers_with_report_save_load_and_onnx(tmp_path):
    model = ConvBNNet().train()
    before = copy.deepcopy(model.state_dict())
    qat = qcompile.prepare_qat(model, calibration_data=_batches(), progress=False, outlier_smoothing=None)
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for (x,) in _batches(6, seed=11):
        optimizer.zero_grad()
        qat(x).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    assert model.training
    state = qat.state_dict()
    assert any(k.endswith("fq_act_0.log_scale") for k in state)
    qm = qcompile.convert_qat(qat)
    assert qm.report.mode == "qat"
    assert [n.precision for n in qm.report.nodes] == ["int8", "int8"]
    assert any("against the fake-quant model" in note for note in qm.report.notes)
    x = _batches(1, seed=9)[0][0]
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qat(x), atol=2e-2 * float(qat(x).abs().max()), rtol=0)
    saved = qm.save(tmp_path / "qat.qcm")
    torch.testing.assert_close(qcompile.load(saved)(x), qm(x))
    export = qm.export_onnx(tmp_path / "qat.onnx")
    assert export.check.worst.max_steps <= 1 and export.check.int8_weight_kernels == 2

    clone = qcompile.prepare_qat(ConvBNNet().train(), calibration_data=_batches(), progress=False,
                                 outlier_smoothing=None)
    clone.load_state_dict(state)
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), qat(x))


class DropoutMlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 16)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.down(self.drop(torch.nn.functional.gelu(self.up(x))))


@pytest.mark.parametrize("activations", ["per-tensor", None])
def test_fp8_qat_trains_the_scales_and_lowers_to_the_float8_graph_exactly(activations, tmp_path):
    teacher = DropoutMlp().eval()
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 32, generator=generator),) for _ in range(4)]
    qat = qcompile.prepare_qat(teacher, calibration_data=batches, target="cpu-fp8", progress=False,
                               qconfig=qcompile.fp8_qconfig(activations=activations))
    assert {m.spec.dtype for m in qat.fake_quantizers().values()} == {"float8_e4m3fn"}
    assert len(qat.fake_quantizers()) == (4 if activations else 2)
    start = {n: m.log_scale.detach().clone() for n, m in qat.fake_quantizers().items()}
    losses = fit(qat, teacher, [{"x": x} for (x,) in batches], steps=40, lr=1e-3, progress=False)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(not torch.equal(start[n], m.log_scale) for n, m in qat.fake_quantizers().items())
    qm = qcompile.convert_qat(qat)
    assert [n.precision for n in qm.report.nodes if n.op == "linear"] == ["fp8", "fp8"]
    assert any("output SQNR inf dB" in note for note in qm.report.notes)  # the Q/DQ graph is the fake-quant one
    constants = [t for t in qm.qdq_graph_module.state_dict().values()]
    assert not any(t.dtype == torch.int32 and t.dim() == 1 and t.numel() in (64, 16) and t.any()
                   for t in constants), "a float8 linear's bias stays float"
    assert sum(t.dtype == torch.float8_e4m3fn for t in constants) == 2  # the two weights
    x = batches[0][0]
    qat.eval()
    with torch.no_grad():
        expected = qat(x)
        # one E4M3 step is 1/8 of a value's magnitude; the kernels add bf16 rounding to it
        torch.testing.assert_close(qm(x), expected, rtol=0, atol=float(expected.abs().max()) / 16)
        torch.testing.assert_close(qcompile.load(qm.save(tmp_path / "fp8_qat.qcm"))(x), qm(x))
    assert qm.export_onnx(tmp_path / "fp8_qat.onnx").check.worst.max_steps <= 1  # ONNX Runtime runs the same graph


class Conv1dBNNet(nn.Module):
    """An audio front end in training: conv1d -> BatchNorm1d -> ReLU, pooled, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(-1))


def test_a_conv1d_with_batchnorm1d_trains_in_folded_form_and_lowers_to_the_int8_convolution():
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, 20, generator=generator),) for _ in range(6)]
    qat = qcompile.prepare_qat(Conv1dBNNet().train(), calibration_data=batches[:3], progress=False,
                               outlier_smoothing=None)
    ops = [str(n.target) for n in qat.graph_module.graph.nodes if n.op == "call_function"]
    assert "aten.conv2d.default" in ops and "aten.conv1d.default" not in ops  # the BatchNorm follows the 2-D conv
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for (x,) in batches[3:]:
        optimizer.zero_grad()
        qat(x).square().mean().backward()
        optimizer.step()
    qm = qcompile.convert_qat(qat)
    assert [n.detail.split(" ")[0] for n in qm.report.nodes] == ["qc.conv2d_int8+relu", "qc.linear_int8"]
    qat.eval()
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(qm(x), qat(x), atol=2e-2 * float(qat(x).abs().max()), rtol=0)


def test_a_model_in_eval_mode_is_captured_for_training_and_said_so():
    model = ConvBNNet().eval()
    with pytest.warns(UserWarning, match="was in eval mode: QAT captures it in training mode"):
        qat = qcompile.prepare_qat(model, calibration_data=_batches(), progress=False)
    assert qat.training and not model.training
    assert any(isinstance(m, nn.Module) and m.training for m in qat.graph_module.children())


def test_a_model_without_trainable_parameters_is_refused():
    model = ConvBNNet()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(QCompileError, match="no trainable parameters"):
        qcompile.prepare_qat(model, calibration_data=_batches())


def test_per_group_weights_lower_to_the_grouped_qdq_form_exactly():
    group = OpQuantConfig(None, QuantSpec("int4", granularity=PerGroup(1, 16)))
    qat_graph = _prepared_until(ConvBNNet().train(), "insert-fake-quant")
    from qcompile.ir.meta import EdgeQuant, QuantAnnotation, set_qspec
    linear = next(n for n in qat_graph.graph.nodes if n.name == "linear")
    set_qspec(linear, QuantAnnotation(inputs=((1, EdgeQuant("weight", group.weight)),), rule="test"))
    fq = InsertFakeQuant()(qat_graph).graph_module
    result = LowerQat()(fq)
    assert not result.of_kind("kept")
    check_graph(result.graph_module, """
    CHECK: qc.dequantize.default({{%[0-9]+}}, {{%[0-9]+}}, {{%[0-9]+}}, None, torch.float32) : f32[5,3,16]
    CHECK: aten.view.default
    CHECK: aten.linear.default
    """)
    fq.eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), fq(x), atol=1e-5, rtol=0)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_insert_fake_quant_trains_a_gptq_rounded_weight_from_its_values_and_grid():
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 32, generator=generator),) for _ in range(8)]
    spec = QuantSpec("int4", False, PerGroup(1, 16), "mse", rounding="gptq")
    gm = _prepared_until(TwoLinears().train(), "insert-fake-quant",
                         qcompile.QConfig(by_op={"linear": OpQuantConfig(None, spec)}), data)
    out = assert_pass_contract(InsertFakeQuant(), gm)
    assert_graph_diff(gm, out, added=[
        "%fc1_weight_rounded = constant fc1_weight_rounded : f32[48,32]",
        "%fq_weight_0 = module[fq_weight_0](%fc1_weight_rounded)",
        "%linear = aten.linear.default(%x, %fq_weight_0, %fc1_bias)",
        "%fc2_weight_rounded = constant fc2_weight_rounded : f32[8,48]",
        "%fq_weight_1 = module[fq_weight_1](%fc2_weight_rounded)",
        "%linear_1 = aten.linear.default(%relu, %fq_weight_1, %fc2_bias)",
    ], removed=[
        "%fc1_weight_q = constant fc1_weight_q : i8[48,2,16]",
        "%fc1_weight_scale = constant fc1_weight_scale : f32[48,2,1]",
        "%fc1_weight_zero_point = constant fc1_weight_zero_point : i32[48,2,1]",
        "%dequantize_default = qc.dequantize.default(%fc1_weight_q, %fc1_weight_scale, %fc1_weight_zero_point,",
        "%view_default = aten.view.default(%dequantize_default, [48, 32])",
        "%linear = aten.linear.default(%x, %view_default, %fc1_bias)",
        "%fc2_weight_q = constant fc2_weight_q : i8[8,3,16]",
        "%fc2_weight_scale = constant fc2_weight_scale : f32[8,3,1]",
        "%fc2_weight_zero_point = constant fc2_weight_zero_point : i32[8,3,1]",
        "%dequantize_default_1 = qc.dequantize.default(%fc2_weight_q, %fc2_weight_scale,",
        "%view_default_1 = aten.view.default(%dequantize_default_1, [8, 48])",
        "%linear_1 = aten.linear.default(%relu, %view_default_1, %fc2_bias)",
    ])
    # fq(W) = W at the start: the rounded values are on the fake-quant's grid (exp(log S) to an ulp)
    fake, values = out.get_submodule("fq_weight_0"), out.get_buffer("fc1_weight_rounded")
    torch.testing.assert_close(fake(values).detach(), values, atol=0, rtol=1e-6)
    torch.testing.assert_close(fake.scale.detach(), gm.get_buffer("fc1_weight_scale").reshape(-1), atol=0, rtol=1e-6)


TOKEN_W4A8 = qcompile.QConfig(by_op={"linear": OpQuantConfig(qcompile.qconfig.TOKEN_ACTIVATION,
                                                               QuantSpec("int4", False, PerGroup(1, 16)))})


def test_insert_fake_quant_reads_per_token_activations_through_a_dynamic_fake_quant():
    """A per-token edge has no observer: it gets a parameterless fake-quant where convert would
    put its run-time Q/DQ, after the edge's root, and nothing to learn."""
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 32, generator=generator),) for _ in range(4)]
    gm = _prepared_until(TwoLinears().train(), "insert-fake-quant", TOKEN_W4A8, data)
    out = assert_pass_contract(InsertFakeQuant(), gm)
    assert_graph_diff(gm, out, added=[
        "%fq_token_0 = module[fq_token_0](%x)",
        "%fq_weight_0 = module[fq_weight_0](%fc1_weight)",
        "%linear = aten.linear.default(%fq_token_0, %fq_weight_0, %fc1_bias)",
        "%fq_token_1 = module[fq_token_1](%relu)",
        "%fq_weight_1 = module[fq_weight_1](%fc2_weight)",
        "%linear_1 = aten.linear.default(%fq_token_1, %fq_weight_1, %fc2_bias)",
    ], removed=[
        "%linear = aten.linear.default(%x, %fc1_weight, %fc1_bias)",
        "%linear_1 = aten.linear.default(%relu, %fc2_weight, %fc2_bias)",
    ])
    assert not list(out.get_submodule("fq_token_0").parameters())
    assert InsertFakeQuant()(out).graph_module.graph.python_code("self").src == out.graph.python_code("self").src


def test_per_token_qat_lowers_to_the_run_time_qdq_exactly():
    """lower-qat turns each per-token fake-quant into choose_qparams_per_token -> quantize ->
    dequantize, which computes what it computed: the lowered model equals the trained one."""
    generator = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 32, generator=generator),) for _ in range(4)]
    model = TwoLinears()
    qat = qcompile.prepare_qat(model, calibration_data=data, qconfig=TOKEN_W4A8, outlier_smoothing=None,
                               progress=False)
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for (x,) in data:
        loss = (qat(x) - model(x)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    qm = qcompile.convert_qat(qat)
    check_graph(qm.qdq_graph_module, """
    CHECK: %0 = input x
    CHECK-NEXT: %1 = qc.choose_qparams_per_token.default(%0, 0, 255, False) : (f32[s0,1], i32[s0,1])
    CHECK: %4 = qc.quantize.default(%0, %2, %3, None, 0, 255, torch.uint8)
    CHECK-NEXT: %5 = qc.dequantize.default(%4, %2, %3, None, torch.float32)
    CHECK: %12 = aten.linear.default(%5,
    CHECK-NEXT: %13 = aten.relu.default(%12)
    CHECK-NEXT: %14 = qc.choose_qparams_per_token.default(%13, 0, 255, False)
    CHECK: %18 = qc.dequantize.default(%17, %15, %16, None, torch.float32)
    CHECK: aten.linear.default(%18,
    """)
    lower = next(p for p in qm.report.passes if p.name == "lower-qat")
    assert lower.stats["dynamic"] == 2
    x = torch.randn(64, 32, generator=generator) * 3
    with torch.no_grad():
        assert torch.equal(qm(x), qat(x))


@pytest.mark.parametrize(("granularity", "symmetric"), [(PerGroup(1, 16), False), (qcompile.PerChannel(0), True)],
                         ids=["affine-group", "channel"])
def test_qat_starts_from_the_gptq_rounded_weights_of_the_ptq_plan(granularity, symmetric):
    """A spec with rounding="gptq" is rounded by the PTQ plan's gptq pass before fake
    quantization: each weight fake-quant starts at GPTQ's (refit) grid and reads GPTQ's values
    as its float weight, so the QAT model in eval mode is the PTQ model, and it trains from there."""
    model = TwoLinears()
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 32, generator=generator),) for _ in range(8)]
    spec = QuantSpec("int4", symmetric, granularity, "mse", rounding="gptq")
    qconfig = qcompile.QConfig(by_op={"linear": OpQuantConfig(None, spec)})
    ptq = qcompile.compile(model, calibration_data=data, qconfig=qconfig, outlier_smoothing=None, progress=False)
    qat = qcompile.prepare_qat(model, calibration_data=data, qconfig=qconfig, outlier_smoothing=None, progress=False)
    gm = qat.graph_module
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.qc.dequantize.default]
    fakes = qat.fake_quantizers()
    assert len(fakes) == 2 and all(f.log_scale.requires_grad for f in fakes.values())
    qdq = ptq.qdq_graph_module
    grids = [constant_value(qdq, quantized_weight(qdq, n.args[1])[0].scale) for n in qdq.graph.nodes
             if n.target == torch.ops.aten.linear.default]
    for fake, grid in zip(fakes.values(), grids, strict=True):
        torch.testing.assert_close(fake.scale.detach(), grid.reshape(-1), rtol=1e-6, atol=0)
    x = data[0][0]
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(x), ptq.qdq_graph_module(x), atol=1e-5, rtol=0)
        rtn = qcompile.compile(model, calibration_data=data, outlier_smoothing=None, progress=False, qconfig=
                               qcompile.QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec(
                                   "int4", symmetric, granularity, "mse"))}))
        assert not torch.allclose(rtn.qdq_graph_module(x), ptq.qdq_graph_module(x), atol=1e-4)  # GPTQ moved it
    qat.train()
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    loss = (qat(x) - model(x).detach()).square().mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad and p.dim() == 2)
    lowered = qcompile.convert_qat(qat)
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(lowered.qdq_graph_module(x), qat(x), atol=1e-5, rtol=0)


# --- Distillation and fit -------------------------------------------------------------------

def test_distillation_reads_hidden_states_by_module_name_and_fit_lowers_the_loss():
    teacher = ConvBNNet(dropout=0.0).eval()
    qat = qcompile.prepare_qat(teacher, calibration_data=_batches(), progress=False)
    data = [b for (b,) in _batches(8, seed=2)]
    with pytest.raises(QCompileError, match="not in the teacher: nope"):
        qcompile.Distillation(qat, teacher, layers=["nope"])
    losses = fit(qat, teacher, data, steps=40, lr=1e-3, layers=["bn"], freeze_batchnorm_after=30, progress=False)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not any(n.op == "call_module" and n.target.startswith("tap_") for n in qat.graph_module.graph.nodes)
    assert qat.graph_module.bn_mode_0.frozen


def test_a_cosine_schedule_decays_both_learning_rates_to_near_zero(monkeypatch):
    teacher = ConvBNNet(dropout=0.0).eval()
    qat = qcompile.prepare_qat(teacher, calibration_data=_batches(), progress=False)
    seen = []
    step = torch.optim.Adam.step

    def recording_step(optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    fit(qat, teacher, [b for (b,) in _batches(4)], steps=8, lr=1e-3, scale_lr=1e-2, lr_schedule="cosine",
        progress=False)
    expected = [[1e-3 * lr_factor("cosine", i, 8), 1e-2 * lr_factor("cosine", i, 8)] for i in range(8)]
    assert sum(seen, []) == pytest.approx(sum(expected, []))
    assert seen[0] == pytest.approx([1e-3, 1e-2]) and seen[4] == pytest.approx([5e-4, 5e-3])
    assert lr_factor("cosine", 7, 8) < 0.04 and lr_factor("constant", 7, 8) == 1.0
    with pytest.raises(QCompileError, match="lr_schedule 'linear' is not one of: constant, cosine"):
        fit(qat, teacher, [b for (b,) in _batches(1)], steps=1, lr_schedule="linear", progress=False)


def test_a_diverging_scale_stops_fit_with_the_node_named():
    teacher = ConvBNNet(dropout=0.0).eval()
    qat = qcompile.prepare_qat(teacher, calibration_data=_batches(), progress=False, outlier_smoothing=None)
    with torch.no_grad():
        qat.graph_module.fq_act_1.log_scale.fill_(float("nan"))
    with pytest.raises(QCompileError, match="dropout_mode_0 in module .drop.*diverged"):
        fit(qat, teacher, [b for (b,) in _batches(2)], steps=3, progress=False)


# --- a real model ---------------------------------------------------------------------------

def test_digits_cnn_at_w4a8_qat_matches_float_and_lowers_exactly():
    """The scikit-learn digits CNN of examples/qat_digits.py: W4A8 QAT (cross-entropy plus
    distillation, BatchNorm frozen for the last epoch) is at least as accurate as W4A8 PTQ,
    within a point of fp32, and its cpu-int8 lowering classifies as the fake-quant model does."""
    from examples.qat_digits import accuracy, digits, qat, train_float, w_a8

    torch.manual_seed(0)
    data = digits()
    model = train_float(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptq = qcompile.compile(model, calibration_data=data.calibration(), qconfig=w_a8(4), outlier_smoothing=None,
                               progress=False)
        trained = qat(model, data, w_a8(4))
        lowered = qcompile.convert_qat(trained)
    fp32, ptq_top1 = accuracy(model, data), accuracy(ptq, data)
    qat_top1, lowered_top1 = accuracy(trained, data), accuracy(lowered, data)
    assert qat_top1 >= ptq_top1 and qat_top1 >= fp32 - 1.0, (fp32, ptq_top1, qat_top1)
    with torch.no_grad():
        agree = (lowered(data.x_test).argmax(1) == trained(data.x_test).argmax(1)).float().mean().item()
    assert agree >= 0.995 and abs(lowered_top1 - qat_top1) <= 0.5
    assert [n.precision for n in lowered.report.nodes] == ["int8", "int8", "int8"]


def test_minilm_qat_lowers_to_exactly_its_fake_quant_model():
    """all-MiniLM-L6-v2: attention dropout is switched with the mode, and after a few distillation
    steps the Q/DQ graph lower-qat makes computes what the fake-quant model computes, bit for
    bit (biases trained at their int32 steps), while the cpu-int8 kernels run it."""
    from tests.models import SentenceEmbedder, docstring_sentences, load_minilm, minilm_inputs

    model, tokenizer = load_minilm()
    teacher = SentenceEmbedder(model).eval()
    sentences = docstring_sentences(24)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 8], 32) for i in (0, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qcompile.prepare_qat(teacher, calibration_data=calibration, progress=False)
    assert sum(1 for m in qat.graph_module.children() if "scaled_dot_product" in str(getattr(m, "op", ""))) == 6
    smoothed = [name for name, _ in qat.named_parameters() if "smoothed_weight" in name]
    assert len(smoothed) >= 12, "the weights smoothing rescaled are trained like the others"
    qat.disable_dropout()
    qat.tap("model.encoder.layer.0")  # the layer's LayerNorm output, not smoothing's rescaled copy of it
    tapped = next(n.args[0] for n in qat.graph_module.graph.nodes if n.op == "call_module" and n.target == "tap_0")
    assert tapped.target == torch.ops.aten.layer_norm.default
    qat.remove_taps()
    losses = fit(qat, teacher, [minilm_inputs(tokenizer, sentences[16:24], 32)], steps=2, lr=1e-5, scale_lr=1e-3,
                 output_loss="cosine", layers=["model.encoder.layer.5"], progress=False)
    assert all(math.isfinite(v) for v in losses)
    qm = qcompile.convert_qat(qat)
    assert "output SQNR inf dB" in qm.report.notes[-1]
    assert sum(n.precision == "int8" for n in qm.report.nodes) == 43  # 36 linears, 6 outlier splits, the table
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qm(**calibration[0]), teacher(**calibration[0])).min()
    assert cosine > 0.98


# --- pruning with QAT -----------------------------------------------------------------------

def test_magnitude_masks_unstructured_and_2_of_4():
    from qcompile.passes.prune_weights import magnitude_mask

    w = torch.tensor([[0.1, -0.9, 0.3, 0.05, 2.0, -0.2, 0.0, 0.7]])
    torch.testing.assert_close(magnitude_mask(w, "2:4", 0.5), torch.tensor([[0., 1., 1., 0., 1., 0., 0., 1.]]))
    torch.testing.assert_close(magnitude_mask(w, "unstructured", 0.25), torch.tensor([[1., 1., 1., 0., 1., 1., 0., 1.]]))


def test_prune_weights_masks_the_planned_weights_and_qat_keeps_the_zeros(tmp_path):
    from qcompile.passes.prune_weights import PruneWeights

    gm = _prepared_until(ConvBNNet().train(), "insert-observers")
    out = assert_pass_contract(PruneWeights(sparsity=0.5), gm)
    assert_graph_diff(gm, out, added=[
        "%conv2d_prune_mask = constant conv2d_prune_mask : f32[3,2,3,3]",
        "%mul_tensor = aten.mul.Tensor(%conv_weight, %conv2d_prune_mask)",
        "%conv2d = aten.conv2d.default(%x, %mul_tensor, %conv_bias, [1, 1], [1, 1])",
        "%linear_prune_mask = constant linear_prune_mask : f32[5,48]",
        "%mul_tensor_1 = aten.mul.Tensor(%fc_weight, %linear_prune_mask)",
        "%linear = aten.linear.default(%flatten, %mul_tensor_1, %fc_bias)",
    ], removed=["%conv2d = aten.conv2d.default(%x, %conv_weight,", "%linear = aten.linear.default(%flatten, %fc_weight,"])
    assert float((out.linear_prune_mask == 0).float().mean()) == 0.5

    qat = qcompile.prepare_qat(ConvBNNet(dropout=0.0).train(), calibration_data=_batches(), progress=False,
                               prune=PruneWeights(pattern="2:4"))
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-2)
    for (x,) in _batches(5, seed=3):
        optimizer.zero_grad()
        qat(x).square().mean().backward()
        optimizer.step()
    qm = qcompile.convert_qat(qat)
    weight = qm.qdq_graph_module.linear_weight_q
    assert (weight.reshape(5, -1, 4) != 0).sum(-1).max() <= 2, "2 of every 4 stay zero through training"
    from safetensors.torch import load_file

    stored = load_file(qm.save(tmp_path / "sparse.qc"))
    values, mask = (stored[f"sparse:weight:linear_weight_q:{part}"] for part in ("values", "mask"))
    assert values.numel() == int((weight != 0).sum()) and mask.numel() == weight.numel() // 8  # 62.5 % of dense
    assert "weight:linear_weight_q" not in stored
    x = _batches(1)[0][0]
    torch.testing.assert_close(qcompile.load(tmp_path / "sparse.qc")(x), qm(x))


def test_a_sparse_tensor_that_does_not_match_its_mask_is_refused(tmp_path):
    import json
    import struct

    from qcompile.artifact import _digest
    from qcompile.passes.prune_weights import PruneWeights
    from safetensors.torch import load, save

    qat = qcompile.prepare_qat(ConvBNNet(dropout=0.0).train(), calibration_data=_batches(), progress=False,
                               prune=PruneWeights(sparsity=0.75))
    path = qcompile.convert_qat(qat).save(tmp_path / "m.qc")
    data = path.read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    document = json.loads(header["__metadata__"]["qcompile"])
    tensors = load(data)
    name = next(iter(document["sparse"]))
    document["sparse"][name] = [document["sparse"][name][0] * 1000, *document["sparse"][name][1:]]  # a huge shape
    document.pop("sha256")
    document["sha256"] = _digest(document, tensors)  # consistent: only the content check can refuse it
    path.write_bytes(save(tensors, metadata={"qcompile": json.dumps(document, sort_keys=True)}))
    with pytest.raises(qcompile.ArtifactError, match="does not match its mask"):
        qcompile.load(path)
