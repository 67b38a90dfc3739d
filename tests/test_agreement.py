"""The benchmarks' embedding agreement: the random-error construction and its agreement."""

import torch
import torch.nn.functional as F

from benchmarks.agreement import embedding_agreement, random_error_agreement, with_random_error


def test_a_random_error_has_each_rows_cosine_exactly():
    # not torch's global draws, which the test starts seeded with 0 like the error's generator
    reference = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cosine = torch.linspace(0.9, 0.99999, 64, dtype=torch.float64)
    moved = with_random_error(reference, cosine, torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.cosine_similarity(moved, reference), cosine, rtol=0, atol=1e-12)
    other = with_random_error(reference, cosine, torch.Generator().manual_seed(1))
    assert F.cosine_similarity(moved - F.normalize(reference), other - F.normalize(reference)).abs().mean() < 0.5


def test_random_errors_stay_where_the_embeddings_spread():
    """Embeddings in a 6-dimensional subspace of 32 (plus a constant offset): the errors drawn
    from their spread have no component outside that subspace."""
    generator = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(32, 6, generator=generator, dtype=torch.float64)).Q
    reference = torch.randn(200, 6, generator=generator, dtype=torch.float64) @ basis.T + 3 * basis[:, 0]
    error = with_random_error(reference, torch.full((200,), 0.99, dtype=torch.float64),
                              torch.Generator().manual_seed(0)) - F.normalize(reference)
    outside = error - error @ basis @ basis.T
    assert float(outside.norm() / error.norm()) < 1e-6


def test_random_error_agreement_falls_as_the_error_grows_and_is_one_without_error():
    torch.manual_seed(7)
    centres = torch.randn(40, 16)
    reference = torch.cat([centres + 0.3 * torch.randn(40, 16) for _ in range(3)])  # neighbours close at hand
    ones = torch.ones(len(reference))
    assert random_error_agreement(reference, ones) == 1.0
    agreements = [random_error_agreement(reference, c * ones) for c in (0.9999, 0.999, 0.99, 0.9)]
    assert agreements == sorted(agreements, reverse=True) and agreements[-1] < 0.9 < agreements[0], agreements
    assert random_error_agreement(reference, 0.99 * ones) == agreements[2]  # the draws are seeded


def test_embedding_agreement_reads_the_same_out_of_its_own_reference():
    reference = torch.randn(50, 8)
    assert embedding_agreement(reference, reference) == (
        "cosine mean 1.00000 min 1.0000, NN agreement 1.000 (random error of that size 1.000)")
