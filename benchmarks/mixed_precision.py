"""Mixed precision under an accuracy budget on all-MiniLM-L6-v2, against one format everywhere.

``compile(accuracy_budget=B)`` searches per linear among cpu-int8's candidates (int8, int8 with
outlier smoothing, int8 on activations quantized per token, weight-only int8, weight-only int4 in
groups of 32, W4A8 groups, float) for the fastest
assignment whose output-cosine drop stays within B (``qcompile.mixed_precision``). The search
reads 64 sentences of its own (``eval_data``); fidelity is then measured on 256 held-out ones,
none of which the search or calibration saw.

Rows: fp32, bf16 eager, all-int8 with smoothing (the default compile), all-int8 without, the
budgeted compiles, and the first budget on cpu-fp8 (its candidates: E4M3 weights with E4M3
activations per tensor or per token or weight-only, INT8 per tensor or per token, float; no
smoothing on that target). Timed at batch 32 x 128 tokens, 2 threads, the rows in turn (median of
``REPEATS``), so drift of this machine hits every row alike.

Run: ``python -m benchmarks.mixed_precision [budget ...]`` (default 0.002).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

import qcompile
from benchmarks.agreement import embedding_agreement
from benchmarks.cpu_int8 import minilm_data
from benchmarks.fp8_vs_int8 import interleaved_ms
from tests.models import SentenceEmbedder, docstring_sentences, load_minilm, minilm_inputs

REPEATS = 10


def main(budgets: list[float]) -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tokenizer = load_minilm()
    fp32 = SentenceEmbedder(model).eval()
    calibration, held_out = minilm_data()
    search = [minilm_inputs(tokenizer, s) for s in (docstring_sentences(32, skip=600),
                                                    docstring_sentences(32, skip=632))]
    with torch.no_grad():
        reference = torch.cat([fp32(**b) for b in held_out])
    bf16 = SentenceEmbedder(load_minilm()[0].bfloat16()).eval()
    models = {"fp32 eager": fp32, "bf16 eager": bf16}
    details = {"fp32 eager": "", "bf16 eager": ""}
    compiles = [("qcompile int8, smoothing (default)", {}),
                ("qcompile int8, no smoothing", {"outlier_smoothing": None})]
    compiles += [(f"qcompile budget {b:g}", {"accuracy_budget": b, "eval_data": search}) for b in budgets]
    compiles.append((f"qcompile budget {budgets[0]:g}, cpu-fp8",
                     {"accuracy_budget": budgets[0], "eval_data": search, "target": "cpu-fp8"}))
    for name, options in compiles:
        start = time.perf_counter()
        qm = qcompile.compile(fp32, calibration_data=calibration, progress=False, **options)
        seconds = time.perf_counter() - start
        models[name] = qm
        details[name] = f"compile {seconds:.0f} s"
        if "accuracy_budget" in options:
            rounds = qm.report.budget["rounds"]
            details[name] += (f"; predicted {rounds[-1]['predicted_loss']:.2e}, measured on the search set "
                              f"{rounds[-1]['measured_loss']:.2e}, {len(rounds) - 1} repairs")
            counts: dict[str, int] = {}
            for chosen in rounds[-1]["choices"].values():
                counts[chosen] = counts.get(chosen, 0) + 1
            details[name] += "; " + ", ".join(f"{k} x{v}" for k, v in counts.items())
            print(f"{name}: " + ", ".join(f"{node} {chosen}" for node, chosen in rounds[-1]["choices"].items()))
            print(qcompile.Sensitivity.from_json(qm.report.budget["sensitivity"]))
    batch = held_out[0]
    times = interleaved_ms({name: (lambda m=m: m(**batch)) for name, m in models.items()}, REPEATS)
    print("\nall-MiniLM-L6-v2, batch 32 x 128 tokens, 2 threads; fidelity on 256 held-out sentences")
    print(f"{'model':<36}{'ms':>8}{'vs fp32':>9}{'vs int8+smooth':>16}  1-cos mean  quality; details")
    for name, module in models.items():
        with torch.no_grad():
            out = torch.cat([module(**b).float() for b in held_out])
        drop = 1 - torch.nn.functional.cosine_similarity(out, reference).mean().item()
        print(f"{name:<36}{times[name]:>8.1f}{times['fp32 eager'] / times[name]:>8.2f}x"
              f"{times['qcompile int8, smoothing (default)'] / times[name]:>15.2f}x  {drop:.2e}  "
              f"{embedding_agreement(out, reference)}; {details[name]}")


if __name__ == "__main__":
    main([float(b) for b in sys.argv[1:]] or [0.002])
