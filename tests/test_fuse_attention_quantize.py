"""fuse-attention-quantize (targets/cpu_int8/fuse_attention_quantize.py): an attention, smoothing's
multiply and the quantize of the int8 linear that reads it become one native qc.attention_quantize,
held to the ops it replaces."""

import pytest
import torch
from torch.nn import functional as F

import qcompile
from qcompile import native
from qcompile.ir.graph import op_arguments
from qcompile.targets.cpu_int8 import FuseAttentionQuantize
from qcompile.targets.cpu_int8.attention import attention_quantize, reference_attention_quantize
from qcompile.testing import check_graph

ISAS = native.available_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("heads, lq, lk, depth, masked, causal, smoothed, dtype", [
    (4, 9, 9, 32, False, False, True, torch.uint8),     # a four-row block and a row left over
    (3, 2, 11, 20, True, False, False, torch.uint8),    # fewer than four rows: read unpacked
    (2, 17, 17, 16, False, True, True, torch.int8),     # causal, signed bytes
    (1, 5, 40, 48, True, False, True, torch.uint8),     # depth past one 32-wide register pair
])
def test_kernel_holds_its_contract(isa, heads, lq, lk, depth, masked, causal, smoothed, dtype):
    g = torch.Generator().manual_seed(lq * lk + depth)
    q, k, v = (torch.randn(2, heads, n, depth, generator=g) for n in (lq, lk, lk))
    mask = None
    if masked:  # padding: the last three keys of the second sample are gone
        mask = torch.zeros(2, 1, 1, lk)
        mask[1, ..., -3:] = torch.finfo(torch.float32).min
    multiplier = torch.rand(heads * depth, generator=g) + 0.5 if smoothed else None
    qmin, qmax, zero_point = (0, 255, 121) if dtype == torch.uint8 else (-128, 127, 0)
    args = (q, k, v, mask, None, causal, multiplier, 0.01, zero_point, qmin, qmax, dtype)
    with native.running_on(isa):
        out = attention_quantize(*args)
    reference = reference_attention_quantize(*args)
    assert out.dtype == dtype and out.shape == reference.shape
    # laid out [batch, length, heads, depth], as qc.attention's output is
    assert out.transpose(1, 2).is_contiguous()
    assert (out.int() - reference.int()).abs().max() <= 1
    assert (out.int() != reference.int()).float().mean() < 0.01


def test_a_multiplier_of_the_wrong_width_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"multiplier must be \[16\] \(heads x value depth\)"):
        attention_quantize(q, q, q, None, None, False, torch.ones(8), 0.1, 0, 0, 255, torch.uint8)


def test_a_float_output_dtype_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="dtype must be uint8 or int8"):
        attention_quantize(q, q, q, None, None, False, None, 0.1, 0, 0, 255, torch.float32)


class AttentionBlock(torch.nn.Module):
    """Self-attention with an output projection, as a transformer block computes it; value
    channel 5 is ten times wider than the rest, so smoothing scales the projection's input."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        with torch.no_grad():
            self.qkv.weight[2 * width + 5] *= 10

    def forward(self, x, mask):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        mask = torch.zeros(2, 1, 1, 8)
        mask[1, ..., 6:] = torch.finfo(torch.float32).min
        batches.append((torch.randn(2, 8, 32, generator=g), mask))
    return batches


@pytest.mark.parametrize("smoothing", [None, 0.75])
def test_compile_quantizes_the_attention_output_in_the_kernel(smoothing):
    batches = _batches(4)
    qm = qcompile.compile(AttentionBlock(), calibration_data=batches, progress=False, outlier_smoothing=smoothing)
    # the bytes go through the layout ops to the projection
    check_graph(qm.graph_module, """
    CHECK: qc.attention_quantize.default
    CHECK: aten.transpose.int
    CHECK: {{aten.view.default|aten.reshape.default}}({{.*}}) : u8[s0,s1,32]
    CHECK: qc.linear_int8.default
    """)
    nodes = list(qm.graph_module.graph.nodes)
    assert torch.ops.qc.attention.default not in {n.target for n in nodes}
    fused = next(n for n in nodes if n.target == torch.ops.qc.attention_quantize.default)
    projection = [n for n in nodes if n.target == torch.ops.qc.linear_int8.default][-1]
    layout = op_arguments(projection)["x"]  # reshape(transpose(fused)): nothing else between them
    assert layout.meta["val"].dtype == torch.uint8 and layout.all_input_nodes[0].all_input_nodes == [fused]
    # smoothing's multiplier moved into the kernel when there was one
    assert (op_arguments(fused)["multiplier"] is not None) == (smoothing is not None)
    assert next(p for p in qm.report.passes if p.name == "fuse-attention-quantize").stats == {"fused": 1}
    x, mask = _batches(5)[-1]
    with torch.no_grad():
        assert F.cosine_similarity(qm(x, mask).flatten(), AttentionBlock()(x, mask).flatten(), dim=0) > 0.999


def test_an_attention_read_in_float_is_left_alone():
    class Returned(AttentionBlock):
        def forward(self, x, mask):
            batch, length, width = x.shape
            q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            flat = y.transpose(1, 2).reshape(batch, length, width)
            return self.out(flat) + flat  # the residual reads the attention output in float

    qm = qcompile.compile(Returned(), calibration_data=_batches(4), progress=False, outlier_smoothing=None)
    targets = {n.target for n in qm.graph_module.graph.nodes}
    assert torch.ops.qc.attention.default in targets and torch.ops.qc.attention_quantize.default not in targets
    assert FuseAttentionQuantize()(qm.graph_module).modified is False
