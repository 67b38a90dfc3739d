"""Factories for the ``qcompile`` command: MODEL and DATA arguments point here.

    qcompile compile examples.cli_models:minilm --calib examples.cli_models:minilm_batches \\
        --out minilm.qc --report minilm.html
    qcompile compile examples.cli_models:tiny_block --calib examples.cli_models:tiny_batches --out tiny.qc

A MODEL factory returns the model and its example inputs; a DATA factory returns the
calibration batches (here, real sentences for all-MiniLM-L6-v2).
"""

from __future__ import annotations

import torch

from tests.models import SentenceEmbedder, TinyBlock, docstring_sentences, load_minilm, minilm_inputs

BATCH = 8


def minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """all-MiniLM-L6-v2 as a sentence embedder, with one batch of real sentences as its example
    keyword inputs (input_ids, attention_mask, ...)."""
    model, tokenizer = load_minilm()
    return SentenceEmbedder(model).eval(), minilm_inputs(tokenizer, docstring_sentences(BATCH))


def minilm_batches() -> list[dict[str, torch.Tensor]]:
    """64 sentences (first lines of standard-library docstrings) in batches of 8, as keyword inputs."""
    _, tokenizer = load_minilm()
    sentences = docstring_sentences(64)
    return [minilm_inputs(tokenizer, sentences[i:i + BATCH]) for i in range(0, len(sentences), BATCH)]


def tiny_block() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A transformer feed-forward block, for quick runs."""
    return TinyBlock(), (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),)


def tiny_batches() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g),) for _ in range(4)]
