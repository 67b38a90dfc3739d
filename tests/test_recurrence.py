"""GRU / LSTM on cpu-int8: split-recurrent (graph-diff), the native recurrence kernels against
ATen's RNNs and their step-by-step reference on both instruction-set paths, and models end to end."""

import pytest
import torch
from torch.nn import functional as F

import qcompile
from qcompile import native
from qcompile.ir.parser import parse_graph
from qcompile.testing import assert_pass_contract, check_graph
from qcompile.targets.cpu_int8.recurrence import reference_gru_recurrence, reference_lstm_recurrence
from qcompile.targets.cpu_int8.split_recurrent import SplitRecurrent

ISAS = native.available_isas()
qc = torch.ops.qc


def _layer(kind, inputs, hidden, bias=True):
    torch.manual_seed(inputs * 7 + hidden)
    return (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(inputs, hidden, bias=bias, batch_first=True).eval()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("shape", [(6, 64, 64, 64), (3, 7, 5, 130), (1, 1, 3, 17), (2, 9, 16, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_recurrence_after_its_input_linear_equals_atens_rnn(kind, shape, bias):
    batch, steps, inputs, hidden = shape
    layer = _layer(kind, inputs, hidden, bias)
    g = torch.Generator().manual_seed(sum(shape))
    x, h0, c0 = torch.randn(batch, steps, inputs, generator=g), torch.randn(batch, hidden, generator=g), \
        torch.randn(batch, hidden, generator=g)
    b_ih, b_hh = (layer.bias_ih_l0, layer.bias_hh_l0) if bias else (None, None)
    with torch.no_grad():
        gates_x = F.linear(x, layer.weight_ih_l0, b_ih)
        if kind == "gru":
            expected = layer(x, h0[None])
            reference = reference_gru_recurrence(gates_x, h0, layer.weight_hh_l0, b_hh, False, True)
        else:
            expected = layer(x, (h0[None], c0[None]))
            expected = (expected[0], *expected[1])
            reference = reference_lstm_recurrence(gates_x, h0, c0, layer.weight_hh_l0, b_hh, False, True)
        for isa in ISAS:
            with native.running_on(isa):
                if kind == "gru":
                    out = qc.gru_recurrence(gates_x, h0, layer.weight_hh_l0, b_hh, False, True)
                else:
                    out = qc.lstm_recurrence(gates_x, h0, c0, layer.weight_hh_l0, b_hh, False, True)
            for got, aten, ref in zip(out, expected, reference):
                aten = aten.reshape(got.shape)
                torch.testing.assert_close(got, aten, rtol=0, atol=2e-6, msg=f"{isa} vs ATen")
                torch.testing.assert_close(got, ref, rtol=0, atol=2e-6, msg=f"{isa} vs the reference")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_reverse_runs_the_steps_last_to_first_and_time_major_layout_reads_the_same(kind):
    hidden, g = 20, torch.Generator().manual_seed(3)
    gates = (3 if kind == "gru" else 4) * hidden
    gx, w = torch.randn(4, 11, gates, generator=g), torch.randn(gates, hidden, generator=g) * 0.3
    states = [torch.randn(4, hidden, generator=g) for _ in range(1 if kind == "gru" else 2)]
    op = qc.gru_recurrence if kind == "gru" else qc.lstm_recurrence
    forward = op(gx, *states, w, None, False, True)
    backward = op(gx.flip(1), *states, w, None, True, True)
    torch.testing.assert_close(backward[0].flip(1), forward[0], rtol=0, atol=0)
    time_major = op(gx.transpose(0, 1), *states, w, None, False, False)  # a strided view, read in place
    torch.testing.assert_close(time_major[0].transpose(0, 1), forward[0], rtol=0, atol=0)


def test_bad_operands_are_errors_that_say_which():
    gx, h0, w = torch.randn(2, 5, 12), torch.randn(2, 4), torch.randn(12, 4)
    with pytest.raises(RuntimeError, match=r"qc.gru_recurrence: h0 must be \[2, 4\], got \[3, 4\]"):
        qc.gru_recurrence(gx, torch.randn(3, 4), w, None, False, True)
    with pytest.raises(RuntimeError, match=r"qc.lstm_recurrence: w_hh must be \[4·hidden, hidden\]"):
        qc.lstm_recurrence(gx, h0, h0, w, None, False, True)
    with pytest.raises(RuntimeError, match="gates_x's last dimension is 12, w_hh needs 15"):
        qc.gru_recurrence(gx, torch.randn(2, 5), torch.randn(15, 5), None, False, True)


GRU_IR = """
    %x = input x : f32[4,10,8]
    %h0 = input h0 : f32[1,4,16]
    %w_ih = constant gru.weight_ih_l0 : f32[48,8]
    %w_hh = constant gru.weight_hh_l0 : f32[48,16]
    %b_ih = constant gru.bias_ih_l0 : f32[48]
    %b_hh = constant gru.bias_hh_l0 : f32[48]
    %gru = aten.gru.input(%x, %h0, [%w_ih, %w_hh, %b_ih, %b_hh], True, 1, 0.0, False, False, True) : (f32[4,10,16], f32[1,4,16])
    %y = operator.getitem(%gru, 0) : f32[4,10,16]
    %h = operator.getitem(%gru, 1) : f32[1,4,16]
    return (%y, %h)
"""


def test_split_recurrent_makes_the_input_product_a_linear_and_the_rest_one_kernel():
    gm = parse_graph(GRU_IR)
    g = torch.Generator().manual_seed(0)
    out = assert_pass_contract(SplitRecurrent(), gm, (torch.randn(4, 10, 8, generator=g), torch.randn(1, 4, 16, generator=g)))
    check_graph(out, """
    CHECK: aten.linear.default(%{{\\d+}}, %{{\\d+}}, %{{\\d+}}) : f32[4,10,48]
    CHECK: aten.select.int(%{{\\d+}}, 0, 0) : f32[4,16]
    CHECK: qc.gru_recurrence.default({{.*}}, False, True) : (f32[4,10,16], f32[4,16])
    CHECK: aten.stack.default
    CHECK-NOT: aten.gru
    """)


def test_a_training_mode_rnn_is_kept_with_the_reason():
    gm = parse_graph(GRU_IR.replace("0.0, False, False, True", "0.0, True, False, True"))
    result = SplitRecurrent()(gm)
    assert not result.modified
    assert result.of_kind("kept") == {"gru": "the gru runs in training mode: it runs as ATen's float gru"}


class Tagger(torch.nn.Module):
    """conv1d front end, a two-layer bidirectional LSTM and a GRU, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 24, 3, padding=1)
        self.lstm = torch.nn.LSTM(24, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = torch.nn.GRU(64, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        h, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
        y, last = self.gru(h)
        return self.head(y[:, -1]) + last[0].mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def tagger():
    """The Tagger and its cpu-int8 compile on 4 batches."""
    torch.manual_seed(0)
    model = Tagger().eval()
    g = torch.Generator().manual_seed(1)
    return model, qcompile.compile(model, calibration_data=[(torch.randn(8, 4, 30, generator=g),) for _ in range(4)],
                                   progress=False)


def test_rnn_models_run_int8_input_products_and_the_native_recurrence(tagger, tmp_path):
    model, qm = tagger
    details = {n.name: (n.precision, n.detail) for n in qm.report.nodes}
    assert sum(p == "int8" for p, _ in details.values()) == 1 + 4 + 1 + 1  # conv, 4 LSTM inputs, GRU input, head
    recurrent = [d for p, d in details.values() if p == "float"]
    assert len(recurrent) == 5 and all("fused fp32 recurrence" in d for d in recurrent)
    kernels = [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.lstm.input not in kernels and torch.ops.aten.gru.input not in kernels
    x = torch.randn(3, 4, 30)
    with torch.no_grad():
        expected = model(x)
        assert F.cosine_similarity(qm(x), expected).min() > 0.999
        loaded = qcompile.load(qm.save(tmp_path / "tagger.qc"))
        torch.testing.assert_close(loaded(x), qm(x), rtol=0, atol=0)


def test_rnn_models_without_calibration_data_quantize_the_input_products_at_run_time():
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(3, 4, 30)
    qm = qcompile.compile(model, (x,))
    assert qm.report.mode == "dynamic"
    with torch.no_grad():
        assert F.cosine_similarity(qm(x), model(x)).min() > 0.999


def test_the_split_recurrence_exports_to_onnx_runtimes_gru_and_lstm(tagger, tmp_path):
    _, qm = tagger
    with pytest.warns(UserWarning, match=r"run in float on dequantized weights.*: conv2d \(conv Conv1d\)"):
        exported = qm.export_onnx(tmp_path / "tagger.onnx")  # the cross-check holds ORT to the Q/DQ graph
    assert exported.check.worst.max_steps < 1e-2
    assert exported.check.ort_ops["GRU"] == 1 and exported.check.ort_ops["LSTM"] == 4
    assert exported.check.int8_kernels["MatMulIntegerToFloat"] == 5  # the input products
    assert exported.bytes < 1.2 * exported.float_bytes  # the identity input weights are made at load time
