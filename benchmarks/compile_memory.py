"""Compile memory: peak and retained resident memory of ``compile`` on all-MiniLM-L6-v2, and
the compiled model's growth over many distinct batch sizes, each as a multiple of what it is
measured against.

* compile peak / retained: resident memory above the loaded model and its data, as a multiple
  of the fp32 model's parameter and buffer bytes (the issue's goal: peak at most 2.5x);
* shape growth: resident memory added by the second 500 of 1000 distinct batch sizes on a
  small MLP (flat when per-shape caches are bounded).

The peak is the kernel's high-water mark (``VmHWM``), reset just before compiling
(``benchmarks.resident``); memory the allocator holds free is returned before each reading.
The first compile in a process is shown apart from the second: it also loads torch.export's
code and caches. Run: ``python -m benchmarks.compile_memory``.
"""

from __future__ import annotations

import gc
import os

import torch

import qcompile
from benchmarks.resident import resident_window, status_mb
from tests.models import docstring_sentences, load_minilm, minilm_inputs


def _model_mb(model: torch.nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _compile_peak(model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """(peak, retained) resident MB above the memory before ``compile``."""
    with resident_window() as window:
        qm = qcompile.compile(model, calibration_data=batches, progress=False)
    del qm
    return window.peak, window.retained


def compile_memory() -> None:
    model, tokenizer = load_minilm()
    sentences = docstring_sentences(64)
    batches = [minilm_inputs(tokenizer, sentences[i : i + 8], 128) for i in range(0, 64, 8)]
    size = _model_mb(model)
    print(f"all-MiniLM-L6-v2, fp32 model {size:.0f} MB, 8 calibration batches of 8x128")
    # The first compile in a process also loads torch.export's machinery and fills its caches
    # (code and interned data, whatever the model); the second shows what compiling costs.
    for label in ("first compile in the process", "second compile"):
        peak, retained = _compile_peak(model, batches)
        print(f"  {label}: peak {peak:4.0f} MB = {peak / size:.2f}x the fp32 model, "
              f"retained {retained:4.0f} MB = {retained / size:.2f}x (compiled model alive)")


def shape_growth() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    qm = qcompile.compile(model, calibration_data=[(torch.randn(8, 64),) for _ in range(3)], progress=False)
    for batch in range(1, 501):
        qm(torch.randn(batch, 64))
    gc.collect()
    middle = status_mb("VmRSS")
    for batch in range(501, 1001):
        qm(torch.randn(batch, 64))
    gc.collect()
    print(f"MLP over 1000 distinct batch sizes: the second 500 added {status_mb('VmRSS') - middle:.1f} MB "
          f"(oneDNN primitive cache capacity {os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY')})")


if __name__ == "__main__":
    torch.set_num_threads(2)
    compile_memory()
    shape_growth()
