"""smooth-outliers (passes/smooth_outliers.py) and finding outlier channels (qcompile/outliers.py)."""

import pytest
import torch
from qcompile.passes import Annotate, SmoothOutliers

import qcompile
from qcompile import QuantSpec
from qcompile.outliers import AUTO_ALPHAS, MeasuredSmoothing, channel_statistics, factor_vector, float_outputs, \
    local_error, outlier_channels, smoothing_factors, smoothing_plan
from qcompile.report import node_outputs
from qcompile.testing import assert_graph_diff, assert_pass_contract, check_graph
from tests.models import OutlierBlock, TinyBlock
from tests.quant_stages import cleaned

LAYER_NORM_AND_GELU = (("layer_norm", ((3, 8.0),)), ("gelu", ((5, 4.0),)))


def test_gelu_outliers_split_into_a_float_path_and_layer_norm_outliers_scale_into_the_weights():
    x = torch.randn(8, 32)
    before = cleaned(OutlierBlock(), x)
    result = SmoothOutliers(outliers=LAYER_NORM_AND_GELU)(before)
    assert result.stats == {"split": {"gelu": 1}, "scaled": {"layer_norm": 1}}
    after = result.graph_module
    assert_graph_diff(before, after, removed=[
        "%linear = aten.linear.default(%layer_norm, %up_weight, %up_bias)",
        "%add = aten.add.Tensor(%layer_norm, %linear_1)",
        "constant up.weight", "constant up.bias",
    ], added=[
        "%layer_norm_smoothing = constant layer_norm_smoothing : f32[32]",
        "%mul_tensor = aten.mul.Tensor(%layer_norm, %layer_norm_smoothing) : f32[s0,32]",
        "constant linear_inlier_weight : f32[64,32]",
        "constant linear_inlier_bias : f32[64]",
        "%linear = aten.linear.default(%mul_tensor, %linear_inlier_weight, %linear_inlier_bias) : f32[s0,64]",
        "constant linear_outlier_weight : f32[1,32]",
        "constant linear_outlier_bias : f32[1]",
        "%linear_default = aten.linear.default(%mul_tensor, %linear_outlier_weight, %linear_outlier_bias) : f32[s0,1]",
        "%gelu_default = aten.gelu.default(%linear_default) : f32[s0,1]",
        "constant linear_1_outlier_weight : f32[1,32]",
        "%matmul_default = aten.matmul.default(%gelu_default, %linear_1_outlier_weight) : f32[s0,32]",
        # the residual add takes the float path first: the int8 linear still fuses one add
        "%add_tensor = aten.add.Tensor(%matmul_default, %layer_norm) : f32[s0,32]",
        "%add = aten.add.Tensor(%linear_1, %add_tensor) : f32[s0,32]",
    ])
    torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-5)


def test_values_the_int8_linears_see_lose_their_outlier_range():
    x = torch.randn(64, 32)
    before = cleaned(OutlierBlock(), x)
    after = SmoothOutliers(outliers=LAYER_NORM_AND_GELU)(before).graph_module
    seen = node_outputs(after, {"mul_tensor", "gelu"}, (x,), {})
    reference = node_outputs(before, {"layer_norm"}, (x,), {})
    torch.testing.assert_close(seen["mul_tensor"][:, 3], reference["layer_norm"][:, 3] / 8.0)
    assert torch.equal(seen["gelu"][:, 5], torch.zeros(64))  # computed by the float path instead


def test_a_gelu_with_another_reader_is_scaled_not_split():
    class SharedGelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = OutlierBlock()

        def forward(self, x):
            g = torch.nn.functional.gelu(self.block.up(x))
            return self.block.down(g) + g.sum(-1, keepdim=True)  # zeroing a channel would change the sum

    x = torch.randn(8, 32)
    result = assert_pass_contract(SmoothOutliers(outliers=(("gelu", ((5, 4.0),)),)), cleaned(SharedGelu(), x), [x])
    check_graph(result, """
    CHECK: %6 = aten.mul.Tensor(%4, %5)
    CHECK: aten.linear.default(%6, %7, %8)
    CHECK: aten.sum.dim_IntList(%4, [-1], True)
    """)


def test_contract_and_nothing_to_do_without_outliers():
    x = torch.randn(8, 32)
    assert_pass_contract(SmoothOutliers(outliers=LAYER_NORM_AND_GELU), cleaned(OutlierBlock(), x), [x])
    result = SmoothOutliers()(cleaned(TinyBlock(), torch.randn(4, 16)))
    assert not result.modified and result.stats == {}


def test_the_outlier_linear_shares_its_sibling_input_and_only_the_product_stays_float():
    x = torch.randn(8, 32)
    smoothed = SmoothOutliers(outliers=LAYER_NORM_AND_GELU)(cleaned(OutlierBlock(), x)).graph_module
    planned = Annotate()(smoothed).graph_module
    plans = {n.name: p for n in planned.graph.nodes if (p := qcompile.get_qspec(n)) and p.quantized}
    assert sorted(plans) == ["linear", "linear_1", "linear_default"]
    assert plans["linear"].edge(0) == plans["linear_default"].edge(0)  # one observer, one quantize
    products = [qcompile.get_qspec(n) for n in planned.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert products and all(not p.quantized and "stays float by design" in p.float_reason for p in products)


def test_outlier_channels_rule_and_factors():
    absmax = torch.tensor([1.0, 1.2, 10.0, 0.8, 5.0, 1.5, 1.0, 0.9])
    # median 1.0: channels over 4x it, largest first, each with its range over the largest
    # remaining channel's (1.5)
    assert outlier_channels(absmax, ratio=4.0, max_fraction=0.5) == ((2, 10.0 / 1.5), (4, 5.0 / 1.5))
    assert outlier_channels(absmax, ratio=4.0, max_fraction=0.01) == ((2, 10.0 / 5.0),)  # at least one
    assert outlier_channels(absmax, ratio=20.0, max_fraction=0.5) == ()


def test_smoothing_factors_migrate_the_range_above_the_median_by_alpha():
    absmax = torch.tensor([1.0, 2.0, 16.0, 0.5, 4.0])  # median 2
    assert smoothing_factors(absmax, alpha=0.5) == ((2, 8.0 ** 0.5), (4, 2.0 ** 0.5))
    assert smoothing_factors(absmax, alpha=1.0) == ((2, 8.0), (4, 2.0))  # all down to the median
    assert smoothing_factors(torch.zeros(4), alpha=0.75) == ()  # a dead value: nothing to scale


def test_smoothing_plan_splits_after_gelu_and_scales_elsewhere():
    x = torch.randn(8, 32)
    gm = cleaned(OutlierBlock(), x)
    plan, chosen = smoothing_plan(gm, ["layer_norm", "gelu"], [(torch.randn(64, 32),)], ((x,), {}), alpha=0.75)
    plan = dict(plan)
    assert chosen == {}  # a fixed strength
    assert [channel for channel, _ in plan["gelu"]] == [5]  # the one outlier, for the float path
    layer_norm = dict(plan["layer_norm"])
    assert len(layer_norm) == 16 and max(layer_norm, key=layer_norm.get) == 3


def test_channel_statistics_cover_every_batch_and_leave_the_graph_alone():
    x = torch.randn(8, 32)
    gm = cleaned(OutlierBlock(), x)
    text = qcompile.print_graph(gm)
    batches = [(torch.randn(8, 32),), (torch.randn(8, 32) * 3,)]
    found = channel_statistics(gm, ["layer_norm"], batches, ((x,), {}), rows=4)
    expected = torch.stack([node_outputs(gm, {"layer_norm"}, b, {})["layer_norm"].abs().amax(0)
                            for b in batches]).amax(0)
    torch.testing.assert_close(found["layer_norm"].absmax, expected)
    assert [tuple(rows.shape) for rows in found["layer_norm"].sample] == [(4, 32), (4, 32)]  # evenly spaced rows
    assert qcompile.print_graph(gm) == text
    with pytest.raises(qcompile.CalibrationError, match="calibration data is empty"):
        channel_statistics(gm, ["layer_norm"], [], ((x,), {}))


def test_compile_smooths_outliers_and_gains_output_sqnr():
    model = OutlierBlock()
    batches = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    smoothed = qcompile.compile(model, calibration_data=iter(batches), progress=False)  # read twice
    plain = qcompile.compile(model, calibration_data=batches, progress=False, outlier_smoothing=None)
    stats = next(p.stats for p in smoothed.report.passes if p.name.startswith("smooth-outliers"))
    assert stats["split"] == {"gelu": 1} and stats["scaled"]["layer_norm"] == 16  # the channels above the median
    assert smoothed.report.output_sqnr_db[0] > plain.report.output_sqnr_db[0] + 6
    assert smoothed.report.calibration_batches == 4


INT8_LINEAR = (qcompile.qconfig.INT8_ACTIVATION, QuantSpec("int8", granularity=qcompile.PerChannel(0)))


def test_local_error_is_the_relative_output_error_of_the_quantized_smoothed_linear():
    """e = ‖Q_x(X / s) · (W ⊙ s)ᵀ − X Wᵀ‖² / ‖X Wᵀ‖² with a float weight, Q_x on X / s's range."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(64, 8, generator=generator), torch.randn(5, 8, generator=generator)
    x[:, 2] *= 20
    activation = qcompile.qconfig.INT8_ACTIVATION
    factors = torch.ones(8)
    factors[2] = 4.0
    smoothed = x / factors
    scale = (smoothed.max() - smoothed.min()) / 255  # uint8, affine: the range over 255 steps
    zero_point = torch.round(-smoothed.min() / scale)
    q = torch.clamp(torch.round(smoothed / scale) + zero_point, 0, 255)
    reference = x @ weight.T
    expected = ((q - zero_point) * scale @ (weight * factors).T - reference).square().sum() / reference.square().sum()
    assert local_error(x, [(weight, activation, None)], factors) == pytest.approx(float(expected), rel=1e-4)
    torch.testing.assert_close(float_outputs(x, [(weight, activation, None)])[0], reference)
    assert local_error(x, [(weight, activation, None)], factors, [reference]) == \
        local_error(x, [(weight, activation, None)], factors)
    # a wide channel costs the other channels precision: moving some of it into the weight helps
    assert local_error(x, [(weight, activation, None)], factors) < local_error(x, [(weight, activation, None)],
                                                                              torch.ones(8))


def test_local_error_quantizes_a_per_token_activation_row_by_row():
    """With a per-token spec Q_x takes each row of X / s over that row's own range."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 8, generator=generator), torch.randn(5, 8, generator=generator)
    x[:4] *= 50  # rows of a larger range: per tensor, they would cost the others precision
    activation = qcompile.qconfig.TOKEN_ACTIVATION
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    reference = x @ weight.T
    expected = ((q - zero_point) * scale @ weight.T - reference).square().sum() / reference.square().sum()
    assert local_error(x, [(weight, activation, None)], torch.ones(8)) == pytest.approx(float(expected), rel=1e-4)
    per_tensor = local_error(x, [(weight, qcompile.qconfig.INT8_ACTIVATION, None)], torch.ones(8))
    assert float(expected) < per_tensor


def test_auto_smoothing_chooses_each_values_strength_of_least_local_error():
    x = torch.randn(8, 32)
    gm = cleaned(OutlierBlock(), x)
    batch = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))  # under SAMPLED_ROWS: every row
    plan, chosen = smoothing_plan(gm, ["layer_norm", "gelu"], [(batch,)], ((x,), {}), alpha="auto",
                                  specs={"linear": INT8_LINEAR})
    values = node_outputs(gm, {"layer_norm"}, (batch,), {})["layer_norm"]
    absmax = values.abs().amax(0)
    readers = [(OutlierBlock().up.weight.detach(), *INT8_LINEAR)]

    def error(alpha):
        return local_error(values, readers, factor_vector(32, smoothing_factors(absmax, alpha) if alpha else ()))

    best = min(AUTO_ALPHAS, key=error)
    assert chosen == {"layer_norm": best} and best > 0  # channel 3 at 12x: smoothing pays
    assert dict(plan)["layer_norm"] == smoothing_factors(absmax, best)
    assert [c for c, _ in dict(plan)["gelu"]] == [5]  # the split form has no strength to choose
    with pytest.raises(ValueError, match="give specs"):
        smoothing_plan(gm, ["layer_norm"], [(batch,)], ((x,), {}), alpha="auto")


def test_compile_with_auto_smoothing_reports_the_strengths_and_refuses_other_words():
    model = OutlierBlock()
    batches = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    auto = qcompile.compile(model, calibration_data=batches, progress=False, outlier_smoothing="auto")
    plain = qcompile.compile(model, calibration_data=batches, progress=False, outlier_smoothing=None)
    stats = next(p.stats for p in auto.report.passes if p.name.startswith("smooth-outliers"))
    assert set(stats["alpha"]) == {"layer_norm"} and stats["alpha"]["layer_norm"] in AUTO_ALPHAS
    assert auto.report.output_sqnr_db[0] > plain.report.output_sqnr_db[0] + 6
    for bad in ("fast", 1.5):
        with pytest.raises(qcompile.QCompileError, match="between 0 and 1, \"auto\""):
            qcompile.compile(model, calibration_data=batches, progress=False, outlier_smoothing=bad)


class Reads(torch.nn.Module):
    """``block`` under another graph: its input passes through ``before`` first."""

    def __init__(self, block: torch.nn.Module, before):
        super().__init__()
        self.block, self.before = block, before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.before(x))


def _smoothed_constants(qm: qcompile.QuantizedModel) -> dict[str, torch.Tensor]:
    """The smoothing factors and the quantized weights smoothing made (biases quantize on the
    activations' calibrated scales, so they follow the data)."""
    return {name: t for name, t in qm.qdq_graph_module.named_buffers()
            if "smoothing" in name or ("lier_weight" in name or "smoothed_weight" in name)}


def test_a_measured_smoothing_applies_in_another_compile_by_the_weights_that_read_each_value():
    """Two programs over the same block (a decoder's prefill and step): the second takes the
    first's channels as they are, though its own data would measure others, so both hold the
    same smoothed weights."""
    block = OutlierBlock()
    batches = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    first = qcompile.compile(Reads(block, torch.nn.Identity()), calibration_data=batches, progress=False)
    assert set(first.smoothing.channels) == {"block.up.weight", "block.down.weight"}
    assert [c for c, _ in first.smoothing.channels["block.down.weight"]] == [5]  # the split GELU channel
    with torch.no_grad():
        expected = smoothing_factors(torch.cat([block.norm(x) for x, in batches]).abs().amax(0), 0.75)
    measured = first.smoothing.channels["block.up.weight"]  # the LayerNorm's, scaled
    assert [c for c, _ in measured] == [c for c, _ in expected]
    assert [f for _, f in measured] == pytest.approx([f for _, f in expected], rel=1e-5)
    second_model = Reads(block, torch.nn.Tanh())  # other values reach the block
    own = qcompile.compile(second_model, calibration_data=batches, progress=False)
    given = qcompile.compile(second_model, calibration_data=batches, progress=False, outlier_smoothing=first.smoothing)
    assert given.smoothing == first.smoothing
    assert own.smoothing != first.smoothing
    ours, theirs = _smoothed_constants(given), _smoothed_constants(first)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(t, theirs[k]) for k, t in _smoothed_constants(own).items())
    assert qcompile.compile(second_model, calibration_data=batches, progress=False,
                            outlier_smoothing=None).smoothing is None


def test_a_measurement_that_does_not_fit_the_model_is_refused_naming_the_value_and_weight():
    batches = [(torch.randn(16, 32),)]
    measured = MeasuredSmoothing({"up.weight": ((40, 2.0),)})  # a channel the 32-wide LayerNorm has not
    with pytest.raises(qcompile.QCompileError, match="'layer_norm' \\(weight 'up.weight'\\) do not fit"):
        qcompile.compile(OutlierBlock(), calibration_data=batches, progress=False, outlier_smoothing=measured)
    with pytest.raises(qcompile.QCompileError, match="another compile.s measurement \\(QuantizedModel.smoothing\\)"):
        qcompile.compile(OutlierBlock(), calibration_data=batches, progress=False, outlier_smoothing={"up.weight": ()})
