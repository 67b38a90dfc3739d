"""qc.attention, the native fused attention kernel: equal to ATen's fp32 attention on every path.

Each case runs on both instruction-set paths this machine has (AVX-512 and the portable C++ one)
against the fp32 reference (``reference_attention``, ATen's scaled_dot_product_attention).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import native
from qcompile.kernel_check import difference
from qcompile.targets.cpu_int8.attention import reference_attention

ISAS = native.available_isas()
LOWEST = torch.finfo(torch.float32).min


def heads(batch, heads, length, depth, generator, transposed=True):
    """[batch, heads, length, depth] operands as a projection's output arrives: a transposed view."""
    if transposed:
        return torch.randn(batch, length, heads, depth, generator=generator).transpose(1, 2)
    return torch.randn(batch, heads, length, depth, generator=generator)


def assert_matches(q, k, v, mask=None, scale=None, causal=False, out_dtype=torch.float32, tolerance=2e-6):
    reference = reference_attention(q, k, v, mask, scale, causal, out_dtype)
    for isa in ISAS:
        with native.running_on(isa):
            out = torch.ops.qc.attention(q, k, v, mask, scale, causal, out_dtype)
        assert out.dtype == out_dtype and out.shape == reference.shape, isa
        error = (out.float() - reference.float()).abs().max().item()
        assert error <= tolerance * max(1.0, reference.abs().max().item()), (isa, error)


@pytest.mark.parametrize("depth", [8, 32, 64, 80, 3])
@pytest.mark.parametrize("lengths", [(1, 1), (7, 9), (128, 128), (1, 300), (33, 17)])
def test_matches_reference_over_shapes(depth, lengths):
    g = torch.Generator().manual_seed(depth * 1000 + lengths[0])
    lq, lk = lengths
    assert_matches(heads(2, 3, lq, depth, g), heads(2, 3, lk, depth, g), heads(2, 3, lk, depth, g))


def test_padding_mask_from_hugging_face_and_the_skipped_tail():
    g = torch.Generator().manual_seed(0)
    q, k, v = (heads(3, 4, 70, 32, g) for _ in range(3))
    mask = torch.zeros(3, 1, 1, 70)
    mask[0, ..., 10:] = LOWEST  # padding, as Hugging Face masks it: never computed
    mask[1, ..., 40:] = float("-inf")
    assert_matches(q, k, v, mask)


def test_a_row_the_mask_removes_entirely():
    """With -inf the row is zeros (as torch gives); with fp32's lowest value every position is
    equally (un)likely, so the row is V's mean, and no position may be skipped."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (heads(2, 2, 6, 16, g) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 2] = float("-inf")
    mask[1, :, 3] = LOWEST
    mask[1, :, :, 4:] = LOWEST
    assert_matches(q, k, v, mask)
    out = torch.ops.qc.attention(q, k, v, mask, None, False, torch.float32)
    assert (out[0, :, 2] == 0).all()
    torch.testing.assert_close(out[1, :, 3], v[1].mean(dim=1))


def test_bool_mask_per_row_and_head():
    g = torch.Generator().manual_seed(2)
    q, k, v = (heads(2, 3, 20, 16, g) for _ in range(3))
    mask = torch.rand(2, 3, 20, 20, generator=g) > 0.4
    mask[0, 1, 5] = False
    assert_matches(q, k, v, mask)


@pytest.mark.parametrize("lengths", [(12, 12), (5, 12), (1, 9)])
def test_causal_and_grouped_query_heads(lengths):
    g = torch.Generator().manual_seed(3)
    lq, lk = lengths
    assert_matches(heads(2, 8, lq, 32, g), heads(2, 2, lk, 32, g), heads(2, 2, lk, 32, g), causal=True)
    assert_matches(heads(1, 6, lq, 16, g), heads(1, 1, lk, 16, g), heads(1, 1, lk, 16, g), scale=0.3)


def test_bf16_operands_and_output():
    g = torch.Generator().manual_seed(4)
    q, k, v = (heads(2, 4, 16, 32, g).bfloat16() for _ in range(3))
    reference = reference_attention(q, k, v, None, None, False, torch.bfloat16)
    out = torch.ops.qc.attention(q, k, v, None, None, False, torch.bfloat16)
    error, allowed = difference(out, reference, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and error <= allowed


def test_output_is_laid_out_for_the_transpose_that_follows():
    g = torch.Generator().manual_seed(5)
    q, k, v = (heads(2, 4, 16, 8, g) for _ in range(3))
    out = torch.ops.qc.attention(q, k, v, None, None, False, torch.float32)
    assert out.transpose(1, 2).is_contiguous()  # so reshape(batch, length, width) is a view


def test_thread_count_does_not_change_the_result():
    g = torch.Generator().manual_seed(6)
    q, k, v = (heads(4, 6, 40, 32, g) for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qc.attention(q, k, v, None, None, False, torch.float32)
        torch.set_num_threads(2)
        two = torch.ops.qc.attention(q, k, v, None, None, False, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each head is computed whole by one thread


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3), lq=st.integers(1, 40),
       lk=st.integers(1, 70), depth=st.integers(1, 40), v_depth=st.integers(1, 40), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzzed_shapes(batch, kv_heads, group, lq, lk, depth, v_depth, causal, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = heads(batch, kv_heads * group, lq, depth, g)
    k, v = heads(batch, kv_heads, lk, depth, g, transposed=False), heads(batch, kv_heads, lk, v_depth, g)
    mask = None
    if masked:
        mask = torch.zeros(batch, 1, 1, lk)
        keep = torch.randint(1, lk + 1, (batch,), generator=g)
        for b in range(batch):
            mask[b, ..., keep[b]:] = LOWEST
    assert_matches(q, k, v, mask, causal=causal and not masked, tolerance=5e-6)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q[0], k, v), r"query must be \[batch, heads, length, depth\]"),
    (lambda q, k, v: (q, k.double(), v), "key must be float32 or bfloat16"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), r"query heads \(4\) must be a multiple of key/value heads \(3, 3\)"),
    (lambda q, k, v: (q, k[:, :, :5], v), "do not fit together"),
    (lambda q, k, v: (q, k[:1], v[:1]), "batch sizes differ"),
])
def test_bad_operands_are_refused_by_name(change, message):
    g = torch.Generator().manual_seed(7)
    q, k, v = (heads(2, 4, 6, 8, g) for _ in range(3))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.qc.attention(*change(q, k, v), None, None, False, torch.float32)


def test_a_mask_and_causal_together_are_refused():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.raises(RuntimeError, match="give a mask or is_causal, not both"):
        torch.ops.qc.attention(q, k, v, torch.zeros(1, 1, 4, 4), None, True, torch.float32)


def test_an_instruction_set_the_cpu_lacks_is_refused():
    with pytest.raises(RuntimeError, match="no instruction set 'avx1024'"):
        with native.running_on("avx1024"):
            pass
