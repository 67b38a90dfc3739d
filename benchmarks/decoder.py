"""Decoder LM serving: prefill and per-token decode latency with a KV cache, fp32 vs bf16 vs int8
vs weight-only int8 / int4 / FP8.

A Llama-style model from its config (width 512, 4 layers, 8 heads / 4 KV heads, MLP 1536,
vocabulary 8000; random weights), 2 threads. Each path runs the same greedy loop
(:func:`qcompile.greedy_decode`): prefill of a 64-token prompt, then 32 decode steps with the
cache growing; the table gives prefill ms and decode ms per token (medians of 3 runs), for
batch 1 and batch 4. int8 is ``qcompile.compile_decoder`` calibrated on 4 prompt batches (W8A8);
the weight-only rows quantize the linears' weights only (int8 per channel on
``_weight_int8pack_mm``, int4 in groups of 32 or 128 on ``_weight_int4pack_mm_for_cpu``, FP8
E4M3 per channel decoded to bf16 on cpu-fp8), activations in bf16. The ONNX Runtime row is the
same W8A8 plan on target onnx-qdq, its prefill and step exported (``export_onnx``) and run by
ONNX Runtime's CPU provider (2 intra-op threads) in the same loop.

Run: ``python -m benchmarks.decoder``
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile
from qcompile import OpQuantConfig, PerChannel, PerGroup, QConfig, QuantSpec
from qcompile.decoder import PrefillProgram, StepProgram

PROMPT, NEW_TOKENS = 64, 32


def timed_decode(prefill, step, ids: torch.Tensor) -> tuple[float, float]:
    """(prefill ms, decode ms per token), medians of 3 runs after one warm-up."""
    runs = []
    for _ in range(4):
        with torch.no_grad():
            start = time.perf_counter()
            logits, *cache = prefill(ids)
            middle = time.perf_counter()
            for _ in range(NEW_TOKENS):
                logits, *cache = step(logits[:, -1].argmax(-1, keepdim=True), *cache)
            end = time.perf_counter()
        runs.append(((middle - start) * 1e3, (end - middle) * 1e3 / NEW_TOKENS))
    return statistics.median(r[0] for r in runs[1:]), statistics.median(r[1] for r in runs[1:])


def weight_only(spec: QuantSpec) -> QConfig:
    """Every linear's weight quantized with ``spec``, activations float (run in bf16)."""
    return QConfig(by_op={"linear": OpQuantConfig(None, spec)})


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 8000, (4, PROMPT), generator=g) for _ in range(4)]
    paths = {"fp32 eager": (PrefillProgram(model), StepProgram(model)),
             "bf16 eager": (PrefillProgram(bf16), StepProgram(bf16))}
    variants = {"qcompile int8": {},
                "weight-only int8": {"qconfig": weight_only(QuantSpec("int8", granularity=PerChannel(0)))},
                "weight-only int4 g32": {"qconfig": weight_only(QuantSpec("int4", granularity=PerGroup(1, 32)))},
                "weight-only int4 g128": {"qconfig": weight_only(QuantSpec("int4", granularity=PerGroup(1, 128)))},
                "weight-only FP8": {"target": "cpu-fp8"}}
    for name, options in variants.items():
        start = time.perf_counter()
        compiled = qcompile.compile_decoder(model, prompts, progress=False, **options)
        print(f"{name}: compile_decoder {time.perf_counter() - start:.0f} s; {compiled.step.report.notes[-1]}")
        paths[name] = (compiled.prefill, compiled.step)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        onnx_qdq = qcompile.compile_decoder(model, prompts, target="onnx-qdq", progress=False)
        exported = onnx_qdq.export_onnx(folder, threads=2)
        print(f"ONNX Runtime int8: compile_decoder + export {time.perf_counter() - start:.0f} s")
        paths["ONNX Runtime int8"] = (exported.prefill, exported.step)
        _table(paths, g)


def _table(paths: dict, g: torch.Generator) -> None:
    print(f"\n{'path':<24}{'batch':>6}{'prefill ms':>12}{'ms/token':>10}{'vs fp32':>9}{'vs bf16':>9}")
    for batch in (1, 4):
        ids = torch.randint(0, 8000, (batch, PROMPT), generator=g)
        results = {name: timed_decode(*programs, ids) for name, programs in paths.items()}
        for name, (prefill_ms, token_ms) in results.items():
            print(f"{name:<24}{batch:>6}{prefill_ms:>12.1f}{token_ms:>10.2f}"
                  f"{results['fp32 eager'][1] / token_ms:>8.2f}x{results['bf16 eager'][1] / token_ms:>8.2f}x")


if __name__ == "__main__":
    main()
