"""The native program runs a lowered graph in one call and returns the GraphModule's outputs bit
for bit; what it cannot express leaves the model on the GraphModule, naming the node."""

import copy

import pytest
import torch
from torch import fx

import qcompile
from qcompile.capture import capture
from qcompile.program import NativeProgram, UnsupportedNode
from qcompile.report import flat_inputs
from qcompile.targets.cpu_int8.onednn import Int8KernelCall
from tests.models import TinyBlock, TinyConvNet


def exported(module: torch.nn.Module, *args: torch.Tensor, dynamic: bool = False) -> fx.GraphModule:
    """``module`` captured as compile captures it (torch.export, the batch dynamic), without
    export's shape guard, so that a kernel meets the wrong shapes."""
    gm = capture(module, args, dynamic=dynamic)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def run_both(gm: fx.GraphModule, *args):
    program = NativeProgram(gm)
    with torch.no_grad():
        return gm(*args), program(flat_inputs(gm, args, {}))


class ManyKinds(torch.nn.Module):
    """Multi-output operators read through getitem, a shape holding the symbolic batch, a tensor
    list, keyword-only and default arguments, a parameter and a constant output."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 8))
        self.register_buffer("mix", torch.randn(9, 8))

    def forward(self, x, y):
        values, indices = torch.max(x, dim=1, keepdim=True)
        left, right = torch.split(x, [3, 5], dim=1)
        h = torch.cat([left * 2, right, values], dim=1)
        h = torch.nn.functional.layer_norm(h, (9,)) @ self.mix
        h = h.reshape(x.shape[0], 2, 4).transpose(1, 2).flatten(1)
        out = torch.nn.functional.linear(h + y, self.weight).to(torch.float64)
        return {"out": out, "indices": indices, "shape": (x.shape[0] * 2, 7)}


@pytest.mark.parametrize("batch", [2, 5, 31])
def test_the_program_returns_the_graphs_outputs_bit_for_bit(batch):
    gm = exported(ManyKinds(), torch.randn(4, 8), torch.randn(4, 8), dynamic=True)
    x, y = torch.randn(batch, 8), torch.randn(batch, 8)
    expected, actual = run_both(gm, x, y)
    assert actual.keys() == expected.keys()
    assert torch.equal(actual["out"], expected["out"]) and actual["out"].dtype == torch.float64
    assert torch.equal(actual["indices"], expected["indices"])
    assert actual["shape"] == expected["shape"] == (2 * batch, 7)


def test_a_node_that_is_no_operator_is_called_back_in_python():
    class PythonCalls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.inner(x)).sum(dim=-1)
            return h[0] + abs(-x.shape[0]), x.chunk(2)[1]

    gm = fx.symbolic_trace(PythonCalls())
    program = NativeProgram(gm)
    assert {"relu", "inner", "chunk"} <= set(program.python_calls)
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected, actual = gm(x), program([x])
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_a_value_the_program_cannot_hold_is_refused_when_checked():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(dict, (), {"a": x}))  # a dict from a Python call
    gm = fx.GraphModule(torch.nn.Module(), graph)
    program = NativeProgram(gm)
    with pytest.raises(UnsupportedNode, match="failed on the example inputs"):
        program.check_against(gm, (torch.ones(2),), {})


def test_the_graphs_own_error_is_not_blamed_on_the_program():
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.output(graph.call_function(torch.ops.aten.mm.default, (x, y)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as caught:
        NativeProgram(gm).check_against(gm, (torch.ones(2, 3), torch.ones(2, 3)), {})
    assert not isinstance(caught.value, UnsupportedNode)


def test_a_kernel_error_names_the_node():
    gm = exported(ManyKinds(), torch.randn(4, 8), torch.randn(4, 8), dynamic=True)
    program = NativeProgram(gm)
    with pytest.raises(RuntimeError, match=r"node '\w+' \(aten::"):
        program([torch.randn(4, 8), torch.randn(4, 9)])


def test_an_operator_written_in_python_runs_and_raises_its_own_exception():
    @torch.library.custom_op("qc_test_program::checked_double", mutates_args=())
    def checked_double(x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.qc_test_program.checked_double.default, (x,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    program = NativeProgram(gm)
    assert torch.equal(program([torch.ones(3)]), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="negative input"):
        program([-torch.ones(3)])


@pytest.mark.parametrize("model, shape", [(TinyBlock(), (4, 16)), (TinyConvNet().eval(), (4, 1, 8, 8))])
def test_a_compiled_model_runs_as_one_native_call_with_the_graphs_answers(model, shape):
    data = [(torch.randn(shape),) for _ in range(3)]
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    assert qm.runs_on.startswith("one native call")
    fresh = torch.randn((7, *shape[1:]))
    with torch.no_grad():
        assert torch.equal(qm(fresh), qm.graph_module(fresh))


def test_a_graph_changed_after_compile_runs_as_its_new_code():
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16),)], progress=False)
    x = torch.randn(3, 16)
    before = qm(x)
    output = qm.graph_module.graph.output_node()
    ((result,),) = output.args
    with qm.graph_module.graph.inserting_before(output):
        doubled = qm.graph_module.graph.call_function(torch.ops.aten.mul.Tensor, (result, 2.0))
    output.args = ((doubled,),)
    qm.graph_module.recompile()
    assert torch.equal(qm(x), before * 2)


def test_a_loaded_model_runs_as_one_native_call(tmp_path):
    qm = qcompile.compile(TinyConvNet().eval(), calibration_data=[(torch.randn(4, 1, 8, 8),)], progress=False)
    loaded = qcompile.load(qm.save(tmp_path / "m.qc"))
    assert loaded.runs_on.startswith("one native call")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), qm(x))


def test_a_deep_copy_reads_its_own_program():
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16),)], progress=False)
    copied = copy.deepcopy(qm)
    assert copied.runs_on.startswith("one native call") and copied._program is not qm._program
    x = torch.randn(5, 16)
    assert torch.equal(copied(x), qm(x))


def test_the_unchecked_call_runs_the_same_program_without_refusing_nan():
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16),)], progress=False)
    x = torch.randn(3, 16)
    assert torch.equal(qm.run_unchecked(x), qm(x))
    x[0, 0] = float("nan")
    qm.run_unchecked(x)  # what the check would refuse reaches the kernels
    with pytest.raises(qcompile.InputError, match="NaN"):
        qm(x)


def test_a_nan_output_matches_itself_bit_for_bit():
    class Nan(torch.nn.Module):
        def forward(self, x):
            return torch.log(x)  # NaN for the negative entries

    gm = exported(Nan(), torch.randn(4, 8))
    program = NativeProgram(gm)
    x = -torch.rand(4, 8)
    program.check_against(gm, (x,), {})  # no UnsupportedNode: the same NaNs on both sides


class Residual(torch.nn.Module):
    """Two residual blocks (conv -> relu -> conv + the block's input -> relu) and a last conv,
    each sum a convolution's post-op adding a uint8 input; ``keep`` also returns a max-pool of the
    first block's output, which so is read again after the second block's sum."""

    def __init__(self, keep: bool = False):
        super().__init__()
        self.keep = keep
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(5))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h1 = torch.relu(self.convs[1](torch.relu(self.convs[0](h))) + h)
        h2 = torch.relu(self.convs[3](torch.relu(self.convs[2](h1))) + h1)
        out = self.convs[4](h2)
        return (out, torch.nn.functional.max_pool2d(h1, 2)) if self.keep else out


def clones(call) -> int:
    with torch.profiler.profile() as profile, torch.no_grad():
        call()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::clone")


@pytest.mark.parametrize("keep", [False, True])
def test_a_residual_nothing_reads_again_is_summed_into_in_place(keep):
    """The program hands a value to its last reader, and conv2d_int8 then accumulates its residual
    into that uint8 tensor rather than into a copy (the fx code, whose names hold the value
    during the call, copies it); a residual read again afterwards is never overwritten."""
    model = Residual(keep).eval()
    data = [(torch.randn(2, 3, 12, 12),) for _ in range(3)]
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    assert qm.runs_on.startswith("one native call")
    calls = [Int8KernelCall.of(node) for node in qm.graph_module.graph.nodes]
    sums = [call for call in calls if call is not None and call.kernel == "conv2d_int8" and call.other is not None]
    assert len(sums) == 2
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected, actual = qm.graph_module(x), qm(x)
    for e, a in zip(expected, actual) if keep else [(expected, actual)]:
        assert torch.equal(a, e)
    copied = clones(lambda: qm.graph_module(x)) - clones(lambda: qm(x))
    assert copied == (1 if keep else 2)  # the first block's input is dead after its sum, always
