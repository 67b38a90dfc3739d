"""The user-written pass in examples/custom_pass.py, inserted with insert_after."""

import torch

import qcompile
from examples.custom_pass import ScaledBlock, SimplifyArithmetic
from qcompile.testing import assert_graph_diff, assert_pass_contract


def test_graph_diff_of_the_custom_pass():
    x = torch.randn(2, 3, 8, 8)
    gm = qcompile.capture(ScaledBlock().eval(), (x,))
    out = SimplifyArithmetic()(gm).graph_module
    assert_graph_diff(
        gm,
        out,
        removed=["%mul = aten.mul.Tensor(%relu, 1.0)", "%add = aten.add.Tensor(%mul, 0.0)", "return (%add,)"],
        added=["return (%relu,)"],
    )
    assert_pass_contract(SimplifyArithmetic(), gm, example_args=(x,))


def test_non_neutral_scalars_stay_with_reason():
    gm = qcompile.capture(ScaledBlock(scale=2.0, shift=0.0).eval(), (torch.randn(2, 3, 8, 8),))
    with qcompile.trace_rules() as tracer:
        out = SimplifyArithmetic()(gm).graph_module
    assert "the scalar is 2.0, not 1" in tracer.explain("mul")
    assert "aten.mul.Tensor" in qcompile.print_graph(out)


def test_inserted_after_fold_batchnorm_in_a_pipeline():
    pipeline = qcompile.Pipeline.parse("canonicalize,fold-batchnorm")
    pipeline.insert_after("fold-batchnorm", SimplifyArithmetic())
    assert str(pipeline) == "canonicalize,fold-batchnorm,simplify-arithmetic"
    x = torch.randn(2, 3, 8, 8)
    model = ScaledBlock().eval()
    result = qcompile.PassManager(pipeline, [qcompile.NumericCheck((x,))], verify=True)(qcompile.capture(model, (x,)))
    assert result.records[2].stats == {"drop-mul-1": 1, "drop-add-0": 1}
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)
