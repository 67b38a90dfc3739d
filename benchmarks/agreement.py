"""How closely a model's sentence embeddings follow the fp32 model's: cosine, nearest-neighbour
agreement, and the agreement a random error of the same size gives.

Nearest-neighbour (NN) agreement counts the sentences whose nearest other sentence is the one
the fp32 embeddings pick. It is set by how an error compares with the gaps between
neighbours, not by its size alone, so a cosine does not fix it. To tell what a row's error
costs by its size from what its direction costs, each row is also scored with the fp32
embeddings moved by errors of the same size in random directions: for a unit reference ``r``
and a unit ``n ⟂ r``, ``r + t·n`` with ``t = √(1 − c²) / c`` has cosine exactly ``c`` to ``r``
(``1 / √(1 + t²) = c``). The directions are drawn from the embeddings' own spread, N(0, Σ)
with Σ the covariance of the unit references, not uniformly: a model's error is made by the
same layers that make the embeddings and lies where they vary (all-MiniLM: its W8A8 error and
the embeddings span about 160 and 60 effective dimensions of 384), and there an error of a
given size moves neighbours more than a uniform one (1536 sentences at W8A8's cosine 0.99892:
NN 0.960 drawn from Σ, 0.978 drawn uniformly, 0.962 measured). Below this agreement a row's
error is aimed at its neighbours; at it, only its size counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Draws of random directions whose agreements are averaged (each reads ±0.01 on 1536 sentences).
DRAWS = 8


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Each row's most similar other row by cosine."""
    unit = F.normalize(embeddings)
    return (unit @ unit.T).fill_diagonal_(-2).argmax(1)


def spread(reference: torch.Tensor) -> torch.Tensor:
    """A factor ``A`` of the unit references' covariance, ``Σ = A·Aᵀ`` (eigenvectors times the
    roots of the eigenvalues, so a rank-deficient Σ has one): ``z·Aᵀ`` with z ~ N(0, I) is N(0, Σ)."""
    values, vectors = torch.linalg.eigh(torch.cov(F.normalize(reference).T))
    return vectors * values.clamp_min(0).sqrt()


def with_random_error(reference: torch.Tensor, cosine: torch.Tensor, generator: torch.Generator,
                      factor: torch.Tensor | None = None) -> torch.Tensor:
    """``reference``'s rows turned in random directions drawn from their spread (N(0, Σ), made
    orthogonal to each row; ``factor`` is :func:`spread` of ``reference`` when given) until row
    i has cosine ``cosine[i]`` to its original."""
    unit = F.normalize(reference)
    factor = spread(reference) if factor is None else factor
    noise = torch.randn(reference.shape, generator=generator, dtype=unit.dtype) @ factor.to(unit.dtype).T
    noise = F.normalize(noise - (noise * unit).sum(1, keepdim=True) * unit)
    c = cosine.to(unit.dtype).clamp(1e-6, 1.0).unsqueeze(1)
    return unit + (1 - c * c).sqrt() / c * noise


def random_error_agreement(reference: torch.Tensor, cosine: torch.Tensor, draws: int = DRAWS,
                           seed: int = 0) -> float:
    """The mean NN agreement of ``reference`` moved by errors of per-row cosine ``cosine`` in random
    directions of its spread."""
    generator = torch.Generator().manual_seed(seed)
    expected, factor = nearest_neighbours(reference), spread(reference)
    return sum(float((nearest_neighbours(with_random_error(reference, cosine, generator, factor)) == expected)
                     .float().mean()) for _ in range(draws)) / draws


def embedding_agreement(out: torch.Tensor, reference: torch.Tensor) -> str:
    """Cosine to the fp32 embeddings, top-1 nearest-neighbour agreement with them, and that
    agreement for errors of the same per-sentence size in random directions."""
    cosine = F.cosine_similarity(out, reference)
    agreement = (nearest_neighbours(out) == nearest_neighbours(reference)).float().mean()
    return (f"cosine mean {cosine.mean():.5f} min {cosine.min():.4f}, NN agreement {agreement:.3f} "
            f"(random error of that size {random_error_agreement(reference, cosine):.3f})")
