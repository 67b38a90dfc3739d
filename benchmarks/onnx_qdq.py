"""ONNX QDQ benchmark: qcompile's exported file in ONNX Runtime against ORT's own quantizer and fp32.

Every row runs in ONNX Runtime in this run (2 intra-op threads, median of 10 calls after 2
warm-up calls), on the same calibration data:

* ORT fp32: the float model exported with torch.onnx (TorchScript exporter, as ORT's docs do);
* ORT quantize_static: ORT's own quantizer on that file (QDQ, uint8 activations, per-channel
  int8 weights, default MinMax calibration);
* qcompile onnx-qdq: ``qcompile.compile(..., target="onnx-qdq").export_onnx(...)``, the file
  cross-checked against the Q/DQ graph in torch during export; for MiniLM also without outlier
  smoothing (``outlier_smoothing=None``), which shows what ``smooth-outliers`` buys.

Workloads: all-MiniLM-L6-v2 (batch 32 x 128, the sentences and metrics of the cpu-int8
benchmark: mean-pooled embedding cosine vs torch fp32 and nearest-neighbour agreement),
ResNet-18 (batch 8 x 3 x 224 x 224: top-1 agreement with torch fp32), and the zoo's
MobileNet-v2 and EfficientNet (batch 8 x 3 x 128 x 128: depthwise convolutions, SiLU,
squeeze-excite, one-sided padding).

Run: ``python -m benchmarks.onnx_qdq [minilm] [resnet] [mobilenet-v2] [efficientnet]`` (all by default).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qcompile
from benchmarks.agreement import embedding_agreement
from benchmarks.cpu_int8 import minilm_data, numpy_feeds
from benchmarks.ort_baselines import float_onnx_file, quantize_static_file, session_runner
from benchmarks.timing import median_ms
from tests.models import SentenceEmbedder, load_minilm, resnet18


def print_table(title: str, rows: list[tuple[str, float, float, str, str]]) -> None:
    """Rows of (path, ms, file MB, quality, note); speed-ups against the first two rows."""
    fp32_ms, ort_int8_ms = rows[0][1], rows[1][1]
    print(f"\n{title}")
    print(f"{'path':<28}{'ms':>9}{'vs fp32':>9}{'vs ORT q':>9}{'file MB':>9}  quality")
    for name, ms, mb, quality, note in rows:
        print(f"{name:<28}{ms:>9.1f}{fp32_ms / ms:>8.2f}x{ort_int8_ms / ms:>8.2f}x{mb:>9.1f}  {quality}"
              + (f"  ({note})" if note else ""))


def compare(model: torch.nn.Module, example: dict[str, torch.Tensor], calibration: list[dict[str, torch.Tensor]],
            timed: dict[str, torch.Tensor], quality: Callable[[Callable[[dict], torch.Tensor]], str],
            title: str, variants: list[tuple[str, dict[str, object]]]) -> None:
    """ORT's two rows and one per qcompile variant (its compile options); inputs are dicts keyed by
    argument name."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        fp32_path = float_onnx_file(model, (), example, folder / "fp32.onnx", list(example))
        start = time.perf_counter()
        ort_path = quantize_static_file(fp32_path, [numpy_feeds(b) for b in calibration], folder / "ort.int8.onnx")
        ort_seconds = time.perf_counter() - start
        files = [("ORT fp32", fp32_path, ""), ("ORT quantize_static", ort_path, f"quantize {ort_seconds:.0f} s")]
        for index, (name, options) in enumerate(variants):
            start = time.perf_counter()
            qm = qcompile.compile(model, example_kwargs=example, target="onnx-qdq", calibration_data=calibration,
                                  progress=False, **options)
            exported = qm.export_onnx(folder / f"qcompile.{index}.onnx")
            print(f"{name}: {exported}")
            files.append((name, exported.path, f"compile + export + cross-check {time.perf_counter() - start:.0f} s"))
        rows = []
        for name, path, note in files:
            run = session_runner(path)
            feeds = numpy_feeds(timed)
            rows.append((name, median_ms(lambda: run(feeds)), path.stat().st_size / 2**20,
                         quality(lambda b: run(numpy_feeds(b))), note))
    print_table(title, rows)


def minilm() -> None:
    model, _ = load_minilm()
    fp32 = SentenceEmbedder(model).eval()
    calibration, evaluation = minilm_data()
    with torch.no_grad():
        reference = torch.cat([fp32(**b) for b in evaluation])

    def quality(run: Callable[[dict], torch.Tensor]) -> str:
        return embedding_agreement(torch.cat([run(b) for b in evaluation]), reference)

    compare(fp32, evaluation[0], calibration, evaluation[0], quality,
            "all-MiniLM-L6-v2 in ONNX Runtime, batch 32 x 128 tokens (embeddings vs torch fp32 on 256 sentences)",
            [("qcompile onnx-qdq", {}), ("qcompile, no outlier smoothing", {"outlier_smoothing": None})])


def resnet() -> None:
    model = resnet18()
    g = torch.Generator().manual_seed(0)
    images = {"x": torch.rand(8, 3, 224, 224, generator=g)}
    calibration = [{"x": torch.rand(8, 3, 224, 224, generator=g)} for _ in range(4)]
    with torch.no_grad():
        reference = model(images["x"])

    def quality(run: Callable[[dict], torch.Tensor]) -> str:
        agree = (run(images).argmax(1) == reference.argmax(1)).float().mean()
        cosine = torch.nn.functional.cosine_similarity(run(images), reference).mean()
        return f"top-1 agreement with fp32 {agree:.2f}, logit cosine {cosine:.4f}"

    compare(model, images, calibration, images, quality, "ResNet-18 in ONNX Runtime, batch 8 x 3 x 224 x 224",
            [("qcompile onnx-qdq", {})])


def zoo_cnn(name: str) -> None:
    """A convolutional row of the architecture zoo (random weights, BatchNorm statistics from data):
    depthwise convolutions, SiLU and squeeze-excite (EfficientNet), ReLU6 and residual chains
    (MobileNet-v2), TF-style one-sided padding (both)."""
    from benchmarks.zoo import ZOO, run, set_batchnorm_statistics

    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    model.eval()
    calibration = [inputs(8, 128, seed) for seed in range(4)]
    set_batchnorm_statistics(model, calibration, run)
    images = {"pixel_values": inputs(8, 128, 100)[0]}
    with torch.no_grad():
        reference = model(**images)

    def quality(run: Callable[[dict], torch.Tensor]) -> str:
        cosine = torch.nn.functional.cosine_similarity(run(images).flatten(1), reference.flatten(1)).min()
        return f"cosine vs fp32 {cosine:.4f} (random weights: see the zoo's bf16 floor)"

    compare(model, images, [{"pixel_values": c[0]} for c in calibration], images, quality,
            f"HF {name} (zoo config) in ONNX Runtime, batch 8 x 3 x 128 x 128", [("qcompile onnx-qdq", {})])


def main() -> None:
    torch.set_num_threads(2)
    workloads = {"minilm": minilm, "resnet": resnet, "mobilenet-v2": lambda: zoo_cnn("mobilenet-v2"),
                 "efficientnet": lambda: zoo_cnn("efficientnet")}
    for name in sys.argv[1:] or list(workloads):
        workloads[name]()


if __name__ == "__main__":
    main()
