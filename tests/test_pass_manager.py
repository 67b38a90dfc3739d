"""Pass manager: order checks, purity, verify mode, instruments, pipeline text, errors."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from qcompile.passes import Canonicalize, FoldBatchNorm
from torch import nn

import qcompile
from qcompile import PassResult


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


@pytest.fixture
def conv_bn():
    torch.manual_seed(0)
    model = ConvBN().eval()
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    return model, x, qcompile.capture(model, (x,))


@dataclass(frozen=True)
class NeedsFolded(qcompile.Pass):
    name: ClassVar[str] = "test-needs-folded"
    requires: ClassVar[frozenset[str]] = frozenset({"bn-folded"})

    def call(self, gm):
        return PassResult(gm, False)


@dataclass(frozen=True)
class Unfolds(qcompile.Pass):
    name: ClassVar[str] = "test-unfolds"
    invalidates: ClassVar[frozenset[str]] = frozenset({"bn-folded"})

    def call(self, gm):
        return PassResult(gm, False)


@dataclass(frozen=True)
class LiesAboutModified(qcompile.Pass):
    name: ClassVar[str] = "test-lies"

    def call(self, gm):
        relu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.target = torch.ops.aten.sigmoid.default
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class ScalesWeightInPlace(qcompile.Pass):
    name: ClassVar[str] = "test-scales-weight-in-place"

    def call(self, gm):
        gm.conv.weight.data.mul_(2)
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class BreaksNumerics(qcompile.Pass):
    name: ClassVar[str] = "test-breaks-numerics"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm):
        relu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.target = torch.ops.aten.sigmoid.default
        return PassResult(gm, modified=True)


@qcompile.register_pass
@dataclass(frozen=True)
class FailsOnNode(qcompile.Pass):
    name: ClassVar[str] = "test-fails-on-node"
    threshold: float = 0.5

    def call(self, gm):
        conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
        raise qcompile.NodeError(conv, "cannot handle this conv")


def test_wrong_order_is_refused_before_anything_runs_naming_both_passes():
    with pytest.raises(qcompile.PipelineOrderError) as info:
        qcompile.PassManager([NeedsFolded(), FoldBatchNorm()])
    message = str(info.value)
    assert "'test-needs-folded' requires 'bn-folded'" in message
    assert "move 'fold-batchnorm' before 'test-needs-folded'" in message


def test_invalidated_property_is_refused():
    with pytest.raises(qcompile.PipelineOrderError, match="'test-unfolds' invalidates"):
        qcompile.PassManager([FoldBatchNorm(), Unfolds(), NeedsFolded()])


def test_missing_property_with_no_provider():
    with pytest.raises(qcompile.PipelineOrderError, match="no pass in the pipeline establishes"):
        qcompile.PassManager([NeedsFolded()])
    qcompile.PassManager([NeedsFolded()], initial_properties={"bn-folded"})


def test_input_graph_and_parameters_are_untouched(conv_bn):
    model, x, gm = conv_bn
    text = qcompile.print_graph(gm, show_provenance=True)
    weight = model.conv.weight.detach().clone()
    result = qcompile.PassManager([Canonicalize(), FoldBatchNorm()], verify=True)(gm)
    assert result.modified
    assert qcompile.print_graph(gm, show_provenance=True) == text
    assert torch.equal(model.conv.weight, weight)
    assert gm.conv.weight is model.conv.weight  # shared, not copied
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-6)


def test_verify_catches_a_pass_that_lies_about_modified(conv_bn):
    _, _, gm = conv_bn
    with pytest.raises(qcompile.PassError, match="test-lies.*reported modified=False but the graph changed"):
        qcompile.PassManager([LiesAboutModified()], verify=True)(gm)
    # Without verification the lie goes unnoticed: that is what verify mode is for.
    qcompile.PassManager([LiesAboutModified()])(gm)


def test_verify_catches_a_pass_that_mutates_shared_weights(conv_bn):
    model, _, gm = conv_bn
    with pytest.raises(qcompile.PassError, match="changed shared tensors in place: conv.weight"):
        qcompile.PassManager([ScalesWeightInPlace()], verify=True)(gm)


def test_numeric_check_catches_a_semantics_claim_that_is_false(conv_bn):
    _, x, gm = conv_bn
    with pytest.raises(qcompile.PassError, match="test-breaks-numerics.*claims to preserve semantics"):
        qcompile.PassManager([BreaksNumerics()], [qcompile.NumericCheck((x,))])(gm)


def test_errors_name_pass_node_module_and_passes_before(conv_bn):
    _, _, gm = conv_bn
    with pytest.raises(qcompile.PassError) as info:
        qcompile.PassManager([Canonicalize(), FoldBatchNorm(), FailsOnNode()])(gm)
    message = str(info.value)
    assert message.startswith("pass 'test-fails-on-node': cannot handle this conv")
    assert "%3 (conv2d: aten.conv2d.default) from module 'conv' (Conv2d)" in message
    assert "passes run before it: canonicalize, fold-batchnorm" in message


def test_pipeline_text_round_trip_and_editing():
    pipeline = qcompile.Pipeline.parse("canonicalize, fold-batchnorm,test-fails-on-node{threshold=0.25}")
    assert str(pipeline) == "canonicalize,fold-batchnorm,test-fails-on-node{threshold=0.25}"
    assert pipeline[2] == FailsOnNode(threshold=0.25)
    pipeline.insert_after("canonicalize", qcompile.passes.EliminateDeadCode()).remove("test-fails-on-node")
    assert str(pipeline) == "canonicalize,eliminate-dead-code,fold-batchnorm"
    assert str(qcompile.Pipeline.parse(str(pipeline))) == str(pipeline)


@pytest.mark.parametrize(
    "text, message",
    [
        ("canonicalize,no-such-pass", "unknown pass 'no-such-pass'"),
        ("test-fails-on-node{bogus=1}", "has no option 'bogus'"),
        ("test-fails-on-node{threshold=high}", "cannot read 'high'"),
        ("canonicalize{", "unbalanced"),
        ("canonicalize,,fold-batchnorm", "empty entry 2"),
        ("canonicalize,", "empty entry 2"),
        ("test-fails-on-node{threshold=0.1,threshold=0.2}", "option 'threshold' of pass 'test-fails-on-node' is given twice"),
    ],
)
def test_pipeline_text_errors(text, message):
    with pytest.raises(qcompile.PipelineParseError, match=message):
        qcompile.Pipeline.parse(text)


def test_dump_ir_writes_numbered_files(conv_bn, tmp_path):
    _, _, gm = conv_bn
    dump = qcompile.DumpIR(tmp_path)
    qcompile.PassManager("canonicalize,fold-batchnorm", [dump])(gm)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "000_input.txt",
        "001_canonicalize.after.txt",
        "001_canonicalize.before.txt",
        "001_canonicalize.diff",
        "002_fold-batchnorm.after.txt",
        "002_fold-batchnorm.before.txt",
        "002_fold-batchnorm.diff",
        "pipeline.txt",
    ]
    assert "-%batch_norm = aten.batch_norm.default" in (tmp_path / "002_fold-batchnorm.diff").read_text()
    assert (tmp_path / "001_canonicalize.after.txt").read_text() == (tmp_path / "002_fold-batchnorm.before.txt").read_text()


def test_environment_turns_on_dumps_and_skips(conv_bn, tmp_path, monkeypatch):
    _, _, gm = conv_bn
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("QCOMPILE_SKIP_PASSES", "fold-batchnorm")
    result = qcompile.PassManager("canonicalize,fold-batchnorm")(gm)
    assert [r.skipped for r in result.records] == [False, True]
    assert (tmp_path / "001_canonicalize.diff").exists()
    assert not (tmp_path / "002_fold-batchnorm.diff").exists()
    assert "aten.batch_norm.default" in qcompile.print_graph(result.graph_module)


def test_timing_and_history(conv_bn):
    _, _, gm = conv_bn
    timing = qcompile.Timing()
    result = qcompile.PassManager([Canonicalize(), FoldBatchNorm()], [timing], keep_history=True)(gm)
    assert list(timing.seconds) == ["001_canonicalize", "002_fold-batchnorm"]
    assert "total" in timing.summary()
    assert len(result.history) == 3 and result.history[0] is gm
    assert "fold-batchnorm" in result.report()


def test_pass_called_alone_is_pure(conv_bn):
    _, x, gm = conv_bn
    text = qcompile.print_graph(gm)
    result = FoldBatchNorm()(gm)
    assert result.modified and result.stats == {"conv2d-batchnorm": 1}
    assert qcompile.print_graph(gm) == text


def test_pass_names_must_be_kebab_case():
    with pytest.raises(ValueError, match="kebab-case"):

        @dataclass(frozen=True)
        class Bad(qcompile.Pass):
            name: ClassVar[str] = "Bad_Name"


def test_pass_returning_wrong_type_is_reported(conv_bn):
    _, _, gm = conv_bn

    @dataclass(frozen=True)
    class ReturnsGraph(qcompile.Pass):
        name: ClassVar[str] = "test-returns-graph"

        def call(self, gm):
            return gm

    with pytest.raises(qcompile.PassError, match="returned GraphModule, not PassResult"):
        qcompile.PassManager([ReturnsGraph()])(gm)


def test_verify_catches_in_place_weight_edit_through_no_grad(conv_bn):
    _, _, gm = conv_bn

    @dataclass(frozen=True)
    class ZeroesBias(qcompile.Pass):
        name: ClassVar[str] = "test-zeroes-bias"

        def call(self, gm):
            with torch.no_grad():
                gm.conv.bias.zero_()
            return PassResult(gm, modified=False)

    with pytest.raises(qcompile.PassError, match="changed shared tensors in place: conv.bias"):
        qcompile.PassManager([ZeroesBias()], verify=True)(gm)


def test_a_user_pass_cannot_take_a_built_in_pass_name():
    with pytest.raises(ValueError, match="'fold-batchnorm' of .*MyFold is already taken by .*FoldBatchNorm"):

        @dataclass(frozen=True)
        class MyFold(qcompile.Pass):
            name: ClassVar[str] = "fold-batchnorm"

    assert qcompile.registered_passes()["fold-batchnorm"] is FoldBatchNorm


def test_pass_names_come_from_one_explicit_registry():
    builtin = {cls.name for cls in qcompile.BUILTIN_PASSES}
    own = {cls.name for target in qcompile.targets().values() for cls in target.passes}
    assert {"canonicalize", "annotate", "calibrate", "convert"} <= builtin
    assert {"lower-cpu-int8", "onnx-residual-sums"} <= own
    assert builtin | own <= set(qcompile.registered_passes())

    @dataclass(frozen=True)
    class Unlisted(qcompile.Pass):  # defining a pass registers nothing
        name: ClassVar[str] = "test-unlisted"

    with pytest.raises(qcompile.PipelineParseError, match="unknown pass 'test-unlisted'"):
        qcompile.Pipeline.parse("canonicalize,test-unlisted")
    assert str(qcompile.Pipeline([Unlisted()])) == "test-unlisted"  # an instance runs without a name lookup
    qcompile.register_pass(Unlisted)
    assert qcompile.Pipeline.parse("test-unlisted")[0] == Unlisted()
    with pytest.raises(TypeError, match="a Pass subclass"):
        qcompile.register_pass(object)


def test_a_typo_in_the_passes_to_skip_is_an_error(conv_bn, monkeypatch):
    _, _, gm = conv_bn
    monkeypatch.setenv("QCOMPILE_SKIP_PASSES", "fold-batchnrom")
    with pytest.raises(qcompile.PipelineParseError, match="cannot skip unknown pass 'fold-batchnrom'"):
        qcompile.PassManager("canonicalize,fold-batchnorm")(gm)


def test_an_instrument_that_fails_is_named_in_a_pass_error(conv_bn):
    _, _, gm = conv_bn

    class Broken(qcompile.Instrument):
        def run_after_pass(self, p, before, result, index):
            raise KeyError("oops")

    with pytest.raises(qcompile.PassError, match="pass 'canonicalize': instrument Broken failed after it: KeyError"):
        qcompile.PassManager("canonicalize", [Broken()])(gm)
