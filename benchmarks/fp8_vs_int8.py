"""FP8 against INT8 on three models: fidelity, the worst layers, bytes, and the speed of what runs.

Every format is compiled from the same calibration data. Rows whose format has kernels on this
CPU run them (cpu-int8: oneDNN u8s8; cpu-fp8: bf16 GEMMs on FP8 weights decoded once, see
``qcompile.targets.cpu_fp8``) and are timed; the other rows are the same Q/DQ graph run as a
reference (target ``study-reference``, registered here: every format, no kernels), which gives
their fidelity and bytes but no speed. Timings interleave the rows (one call of each in turn,
median of ``REPEATS``), 2 threads, so slow drift of this machine does not favour a row.

* all-MiniLM-L6-v2: batch 32 x 128 tokens, 256 docstring sentences to calibrate and 256 others
  to evaluate: embedding cosine to fp32 (mean / min) and top-1 nearest-neighbour agreement.
* digits CNN (trained here on scikit-learn's digits): top-1 accuracy; and ResNet-18 (random
  weights): output SQNR against fp32 on fresh images.
* a Llama-style decoder trained here (tests.models.train_tiny_decoder): 16 held-out prompts
  decoded greedily for 32 tokens with a KV cache; share of tokens equal to fp32's.

Run: ``python -m benchmarks.fp8_vs_int8 [minilm] [cnn] [decoder]`` (all by default).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import qcompile
from benchmarks.agreement import embedding_agreement
from benchmarks.cpu_int8 import minilm_data, tensor_bytes
from qcompile import OpQuantConfig, QConfig, QuantSpec
from qcompile.qconfig import INT8_ACTIVATION, INT8_WEIGHT, fp8_qconfig
from qcompile.report import sqnr_db
from qcompile.spec import FLOAT8_DTYPES, PerChannel, PerTensor, PerToken
from qcompile.targets.base import CONVERT, DYNAMIC_PREPARE, PREPARE, OpRule, Target, register_target
from tests.models import SentenceEmbedder, load_minilm, resnet18, train_tiny_decoder

REPEATS = 8
E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
EVERY_FORMAT = ("int8", "uint8", *FLOAT8_DTYPES)


def study_target() -> Target:
    """Every format on linears, convolutions and tables as a reference Q/DQ graph (no kernels)."""
    rule = OpRule(activation_dtypes=EVERY_FORMAT, weight_dtypes=EVERY_FORMAT, weight_only=True,
                  activation_granularities=(PerTensor, PerToken))
    return register_target(Target(
        name="study-reference", description="every format as a reference Q/DQ graph, for fidelity studies",
        op_rules={"linear": rule, "conv2d": dataclasses.replace(rule, activation_granularities=(PerTensor,)),
                  "embedding": OpRule(activations=(), weight=0, bias=None, weight_dtypes=EVERY_FORMAT,
                                      lookup_indices=1)},
        preset=qcompile.int8_preset, prepare=PREPARE, convert=CONVERT, lower="eliminate-dead-code",
        dynamic_prepare=DYNAMIC_PREPARE, dynamic_convert="cast-fp8{dynamic=true},convert{dynamic=true}",
        unlowered="reference Q/DQ (fidelity study)"))


def int8_config(weight_granularity=PerChannel(0), activations: str | None = "per-tensor",
                ops: tuple[str, ...] = ("linear",)) -> QConfig:
    """uint8 activations (static per tensor, per token at run time, or none) and int8 weights."""
    weight = QuantSpec("int8", granularity=weight_granularity)
    activation = {"per-tensor": INT8_ACTIVATION, "per-token": QuantSpec("uint8", symmetric=False,
                                                                         granularity=PerToken()), None: None}[activations]
    return QConfig(by_op={**{op: OpQuantConfig(activation, weight) for op in ops},
                          "embedding": OpQuantConfig(None, INT8_WEIGHT)})


def with_convolutions(config: QConfig) -> QConfig:
    return config.set_op("conv2d", config.by_op["linear"])


@dataclass
class Variant:
    name: str
    target: str
    qconfig: QConfig | None
    smoothing: bool = False

    @property
    def runs_kernels(self) -> bool:
        return self.target != "study-reference"

    def options(self) -> dict:
        return {"target": self.target, "qconfig": self.qconfig, "progress": False,
                **({} if self.smoothing or self.target == "cpu-fp8" else {"outlier_smoothing": None})}


TRANSFORMER_VARIANTS = [
    Variant("INT8 W8A8, per-tensor weights", "study-reference", int8_config(PerTensor())),
    Variant("INT8 W8A8 (cpu-int8, no smoothing)", "cpu-int8", None),
    Variant("INT8 W8A8 + smoothing (cpu-int8)", "cpu-int8", None, smoothing=True),
    Variant("INT8 W8, per-token dynamic A8", "study-reference", int8_config(activations="per-token")),
    Variant("INT8 weight-only", "study-reference", int8_config(activations=None)),
    Variant("FP8 E4M3 W8A8, every linear FP8", "study-reference", fp8_qconfig(E4M3)),
    Variant("FP8 E4M3 W8A8 (cpu-fp8)", "cpu-fp8", fp8_qconfig(E4M3)),
    Variant("FP8 E4M3 W8A8 + smoothing", "study-reference", fp8_qconfig(E4M3), smoothing=True),
    Variant("FP8 E4M3 W8, per-token A8 (cpu-fp8)", "cpu-fp8", fp8_qconfig(E4M3, "per-token")),
    Variant("FP8 E4M3 weight-only (cpu-fp8)", "cpu-fp8", fp8_qconfig(E4M3, None)),
    Variant("FP8 E5M2 W8A8 (cpu-fp8)", "cpu-fp8", fp8_qconfig(E5M2)),
    Variant("FP8 E5M2 weight-only (cpu-fp8)", "cpu-fp8", fp8_qconfig(E5M2, None)),
]


def artifact_bytes(qm: qcompile.QuantizedModel) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return qm.save(Path(folder) / "model.qc").stat().st_size


def worst_layers(qm: qcompile.QuantizedModel, count: int = 3) -> str:
    """The lowest node SQNRs; for a cpu-fp8 mix, how many linears fp8-or-int8 planned as INT8."""
    nodes = sorted((n for n in qm.report.nodes if n.sqnr_db is not None and n.precision != "float"),
                   key=lambda n: n.sqnr_db)
    text = ", ".join(f"{n.module.split(' ')[0].removeprefix('model.encoder.')} {n.sqnr_db:.1f}" for n in nodes[:count])
    decided = next((p.stats for p in qm.report.passes if p.name.startswith("fp8-or-int8") and p.stats.get("int8")), None)
    if decided:
        text += f" ({decided['int8']} of {decided['int8'] + decided['fp8']} W8A8 linears INT8 by fp8-or-int8)"
    return text


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int = REPEATS) -> dict[str, float]:
    """Median ms of each call, the calls taken in turn so that drift hits every row alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


@dataclass
class Result:
    name: str
    quality: str
    worst: str = ""
    bytes: int | None = None
    call: Callable[[], object] | None = None


def print_table(title: str, results: list[Result], float_bytes: int) -> None:
    calls = {r.name: r.call for r in results if r.call is not None}
    ms = interleaved_ms(calls)
    fp32_ms, bf16_ms = ms.get("fp32 eager"), ms.get("bf16 eager")
    print(f"\n{title}")
    print(f"{'format':<40}{'ms':>8}{'vs bf16':>9}{'KB':>9}{'of fp32':>8}  quality; worst layers (SQNR dB)")
    for r in results:
        speed = f"{ms[r.name]:>8.1f}{bf16_ms / ms[r.name]:>8.2f}x" if r.name in ms else f"{'-':>8}{'':>9}"
        size = f"{r.bytes / 1024:>9.0f}{r.bytes / float_bytes:>8.0%}" if r.bytes else f"{'':>17}"
        print(f"{r.name:<40}{speed}{size}  {r.quality}" + (f"; {r.worst}" if r.worst else ""))
    if fp32_ms:
        print(f"(fp32 eager {fp32_ms:.1f} ms; KB: the saved file, against {float_bytes / 1024:.0f} KB of fp32 weights)")


# ----------------------------------------------------------------------------------------------


def minilm() -> None:
    model, _ = load_minilm()
    calibration, evaluation = minilm_data()
    fp32 = SentenceEmbedder(model).eval()
    bf16 = SentenceEmbedder(load_minilm()[0].bfloat16()).eval()
    with torch.no_grad():
        reference = torch.cat([fp32(**b) for b in evaluation])

    def quality(run: Callable) -> str:
        with torch.no_grad():
            return embedding_agreement(torch.cat([run(**b).float() for b in evaluation]), reference)

    batch = evaluation[0]
    results = [Result("fp32 eager", "reference", call=lambda: fp32(**batch)),
               Result("bf16 eager", quality(bf16), call=lambda: bf16(**batch))]
    for variant in TRANSFORMER_VARIANTS:
        qm = qcompile.compile(fp32, calibration_data=calibration, **variant.options())
        results.append(Result(variant.name, quality(qm), worst_layers(qm), artifact_bytes(qm),
                              (lambda m=qm: m(**batch)) if variant.runs_kernels else None))
    print_table("all-MiniLM-L6-v2, batch 32 x 128 tokens: embeddings against fp32 on 256 held-out sentences",
                results, tensor_bytes(fp32))


def cnn() -> None:
    from examples.qat_digits import accuracy, digits, train_float

    data = digits()
    model = train_float(data)
    variants = [
        Variant("INT8 W8A8 (cpu-int8)", "cpu-int8", None),
        Variant("INT8 W8A8, per-tensor weights", "study-reference", with_convolutions(int8_config(PerTensor()))),
        Variant("INT8 weight-only", "study-reference", with_convolutions(int8_config(activations=None))),
        Variant("FP8 E4M3 W8A8", "study-reference", with_convolutions(fp8_qconfig(E4M3))),
        Variant("FP8 E4M3 weight-only", "study-reference", with_convolutions(fp8_qconfig(E4M3, None))),
        Variant("FP8 E5M2 W8A8", "study-reference", with_convolutions(fp8_qconfig(E5M2))),
    ]
    results = [Result("fp32 eager", f"top-1 {accuracy(model, data):.2f} %")]
    for variant in variants:
        qm = qcompile.compile(model, calibration_data=data.calibration(), **variant.options())
        results.append(Result(variant.name, f"top-1 {accuracy(qm, data):.2f} %", worst_layers(qm), artifact_bytes(qm)))
    print_table(f"digits CNN ({len(data.x_test)} test images)", results, tensor_bytes(model))

    resnet = resnet18()
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(8, 3, 64, 64, generator=generator),) for _ in range(4)]
    fresh = torch.randn(8, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = resnet(fresh)
    results = [Result("fp32 eager", "reference", call=lambda: resnet(fresh))]
    bf16 = resnet18().bfloat16()
    results.append(Result("bf16 eager", sqnr_text(expected, bf16(fresh.bfloat16()).float()),
                          call=lambda: bf16(fresh.bfloat16())))
    for variant in variants:
        qm = qcompile.compile(resnet, calibration_data=calibration, **variant.options())
        with torch.no_grad():
            quality = sqnr_text(expected, qm(fresh))
        results.append(Result(variant.name, quality, worst_layers(qm), artifact_bytes(qm),
                              (lambda m=qm: m(fresh)) if variant.runs_kernels else None))
    print_table("ResNet-18 (random weights), batch 8 x 3 x 64 x 64: output against fp32 on fresh images", results,
                tensor_bytes(resnet))


def sqnr_text(expected: torch.Tensor, actual: torch.Tensor) -> str:
    return f"output SQNR {sqnr_db(expected, actual.detach()):.1f} dB"


def decoder() -> None:
    from qcompile.decoder import PrefillProgram, StepProgram

    trained = train_tiny_decoder()
    model = trained.model
    prompts = [torch.stack(trained.held_out[i:i + 4]) for i in range(0, 32, 4)]
    calibration, held_out = prompts[:4], prompts[4:]
    prefill, step = PrefillProgram(model), StepProgram(model)
    expected = [qcompile.greedy_decode(prefill, step, p, 32) for p in held_out]

    def agreement(generate: Callable[[torch.Tensor], torch.Tensor]) -> str:
        tokens = same_prompts = 0
        for prompt, reference in zip(held_out, expected):
            out = generate(prompt)
            tokens += int((out[:, prompt.shape[1]:] == reference[:, prompt.shape[1]:]).sum())
            same_prompts += sum(torch.equal(a, e) for a, e in zip(out, reference))
        total = sum(len(p) for p in held_out)
        return f"greedy tokens equal to fp32 {tokens / (total * 32):.3f}, prompts identical {same_prompts}/{total}"

    bf16 = copy.deepcopy(model).bfloat16()
    bf16_prefill, bf16_step = PrefillProgram(bf16), StepProgram(bf16)
    results = [Result("fp32 eager", "reference", call=lambda: qcompile.greedy_decode(prefill, step, held_out[0], 32)),
               Result("bf16 eager", agreement(lambda p: qcompile.greedy_decode(bf16_prefill, bf16_step, p, 32)),
                      call=lambda: qcompile.greedy_decode(bf16_prefill, bf16_step, held_out[0], 32))]
    for variant in TRANSFORMER_VARIANTS:
        compiled = qcompile.compile_decoder(model, calibration, **variant.options())
        results.append(Result(variant.name, agreement(lambda p, c=compiled: c.generate(p, 32)),
                              worst_layers(compiled.prefill), artifact_bytes(compiled.prefill),
                              (lambda c=compiled: c.generate(held_out[0], 32)) if variant.runs_kernels else None))
    print_table(f"Llama-style decoder trained here ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
                "parameters): 16 held-out prompts, 32 greedy tokens with a KV cache (ms per 4-prompt batch)",
                results, tensor_bytes(model))


def main() -> None:
    torch.set_num_threads(2)
    study_target()
    workloads = {"minilm": minilm, "cnn": cnn, "decoder": decoder}
    for name in sys.argv[1:] or list(workloads):
        workloads[name]()


if __name__ == "__main__":
    main()
