"""How closely a model's sentence embeddings follow the fp32 model's: cosine, nearest-neighbour
agreement, and the agreement the same error would give in random directions.

Nearest-neighbour (NN) agreement counts the sentences whose nearest other sentence is the one
the fp32 embeddings pick. It is set by how an error compares with the gaps between
neighbours, not by its size alone, so a cosine does not fix it. To tell what a row's error
costs by its size from what its direction costs, each row is also scored with the fp32
embeddings moved by errors of the same size in random directions: for a unit reference ``r``
and a unit ``n ⟂ r``, ``r + t·n`` with ``t = √(1 − c²) / c`` has cosine exactly ``c`` to ``r``
(``1 / √(1 + t²) = c``). Below that "random-error" agreement, the error is aimed badly (it
moves sentences towards each other's neighbours); above it, aimed well.
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


def with_random_error(reference: torch.Tensor, cosine: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``reference``'s rows turned in random directions until row i has cosine ``cosine[i]`` to its original."""
    unit = F.normalize(reference)
    noise = torch.randn(reference.shape, generator=generator, dtype=unit.dtype)
    noise = F.normalize(noise - (noise * unit).sum(1, keepdim=True) * unit)
    c = cosine.to(unit.dtype).clamp(1e-6, 1.0).unsqueeze(1)
    return unit + (1 - c * c).sqrt() / c * noise


def random_error_agreement(reference: torch.Tensor, cosine: torch.Tensor, draws: int = DRAWS,
                           seed: int = 0) -> float:
    """The mean NN agreement of ``reference`` moved by errors of per-row cosine ``cosine`` in random directions."""
    generator = torch.Generator().manual_seed(seed)
    expected = nearest_neighbours(reference)
    return sum(float((nearest_neighbours(with_random_error(reference, cosine, generator)) == expected).float().mean())
               for _ in range(draws)) / draws


def embedding_agreement(out: torch.Tensor, reference: torch.Tensor) -> str:
    """Cosine to the fp32 embeddings, top-1 nearest-neighbour agreement with them, and that
    agreement for errors of the same per-sentence size in random directions."""
    cosine = F.cosine_similarity(out, reference)
    agreement = (nearest_neighbours(out) == nearest_neighbours(reference)).float().mean()
    return (f"cosine mean {cosine.mean():.5f} min {cosine.min():.4f}, NN agreement {agreement:.3f} "
            f"(random error of that size {random_error_agreement(reference, cosine):.3f})")
