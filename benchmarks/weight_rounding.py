"""How weights are put on their grid: round-to-nearest, bias correction and GPTQ, at 4 bits.

all-MiniLM-L6-v2 with weight-only int4 linears in groups of 32 (bf16 activations, the int4pack
kernel), compiled for cpu-int8. Each row: the weight spec, the embedding cosine to fp32 and the
nearest-neighbour agreement on 256 held-out sentences (``benchmarks.cpu_int8.minilm_data``),
and the compile time. Calibration: 1024 other sentences in batches of 16 padded to their
longest (a batch padded to 128 tokens is mostly [PAD] rows, which would dominate GPTQ's
Hessian: 87 % of the rows of ``minilm_data``'s batches are padding).

GPTQ rows refit each group's scale for the integers it chose and then revisit each integer by
coordinate descent (``gptq``'s defaults); the "no descent" rows leave out the descent and
"neither" the refit too, to show what each adds. With ``bias_correction`` GPTQ rounds for the
error left once the bias takes its mean, and shifts the bias.

Run: ``python -m benchmarks.weight_rounding [sequential]`` (``sequential`` adds GPTQ's
level-by-level Hessians).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace

import torch

import qcompile
from benchmarks.agreement import embedding_agreement
from benchmarks.cpu_int8 import minilm_data
from qcompile.passes import Gptq
from qcompile.targets import Target, get_target
from tests.models import SentenceEmbedder, docstring_sentences, load_minilm

CALIBRATION_SENTENCES = 1024


def unpadded_calibration(tokenizer, count: int = CALIBRATION_SENTENCES, batch: int = 16) -> list[dict]:
    """``count`` sentences none of ``minilm_data`` uses, sorted by length, in batches padded to their longest."""
    sentences = sorted(docstring_sentences(count, skip=512), key=len)
    batches = []
    for i in range(0, count, batch):
        encoded = tokenizer(sentences[i:i + batch], padding="longest", truncation=True, max_length=128,
                            return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tokenizer = load_minilm()
    fp32 = SentenceEmbedder(model).eval()
    _, evaluation = minilm_data()
    calibration = unpadded_calibration(tokenizer)
    with torch.no_grad():
        reference = torch.cat([fp32(**b) for b in evaluation])
    group = qcompile.PerGroup(1, 32)
    rows = {
        "nearest, min-max, symmetric": qcompile.QuantSpec("int4", granularity=group),
        "nearest, mse clip, affine": qcompile.QuantSpec("int4", False, group, "mse"),
        "nearest + bias correction": qcompile.QuantSpec("int4", granularity=group, bias_correction=True),
        "nearest + bias correction, mse, affine": qcompile.QuantSpec("int4", False, group, "mse",
                                                                      bias_correction=True),
        "GPTQ, min-max, symmetric": qcompile.QuantSpec("int4", granularity=group, rounding="gptq"),
        "GPTQ, mse clip, affine": qcompile.QuantSpec("int4", False, group, "mse", rounding="gptq"),
        "GPTQ + bias correction, mse, affine": qcompile.QuantSpec("int4", False, group, "mse", rounding="gptq",
                                                                   bias_correction=True),
    }
    cpu = get_target("cpu-int8")

    def with_gptq(**options) -> Target:
        return replace(cpu, prepare=cpu.pipeline("prepare").replace("gptq", Gptq(**options)))

    print(f"all-MiniLM-L6-v2, weight-only int4 in groups of 32; {CALIBRATION_SENTENCES} calibration sentences, "
          "256 held-out ones")
    runs = [(name, spec, "cpu-int8") for name, spec in rows.items()]
    runs += [("GPTQ, mse clip, affine, no descent", rows["GPTQ, mse clip, affine"], with_gptq(descent_sweeps=0)),
             ("GPTQ, mse clip, affine, neither", rows["GPTQ, mse clip, affine"],
              with_gptq(descent_sweeps=0, refit_scales=False)),
             ("GPTQ + bias correction, no descent", rows["GPTQ + bias correction, mse, affine"],
              with_gptq(descent_sweeps=0))]
    if "sequential" in sys.argv[1:]:
        runs.append(("GPTQ + bias correction, sequential", rows["GPTQ + bias correction, mse, affine"],
                     with_gptq(sequential=True)))
    for name, spec, target in runs:
        qconfig = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(None, spec)})
        start = time.perf_counter()
        qm = qcompile.compile(fp32, calibration_data=calibration, qconfig=qconfig, target=target,
                              outlier_smoothing=None, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = torch.cat([qm(**b).float() for b in evaluation])
        print(f"{name:<42} {embedding_agreement(out, reference)}   compile {seconds:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
