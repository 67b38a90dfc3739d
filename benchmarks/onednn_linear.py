"""Kernel benchmark: oneDNN int8 linear against fp32 and bf16 on all-MiniLM-L6-v2's shapes.

Batch 32 x 128 tokens = 4096 rows through MiniLM's three linear shapes. Every row is measured
in the same run (2 threads, median of 20 after 3 warm-up calls); the ratios are what matter.
This bounds what ``lower-cpu-int8`` can reach: the kernel speed-up before any graph overhead.

Run: ``python -m benchmarks.onednn_linear``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qc.*)
from benchmarks.timing import median_ms
from qcompile.spec import PerChannel, QuantSpec, compute_qparams

ROWS = 32 * 128
SHAPES = [("attention q/k/v/out", 384, 384), ("intermediate (+gelu)", 384, 1536), ("output", 1536, 384)]



def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    qc = torch.ops.qc
    act, weight_spec = QuantSpec("uint8", symmetric=False), QuantSpec("int8", granularity=PerChannel(0))
    print(f"{'shape (4096 rows)':<24}{'fp32 ms':>9}{'bf16 ms':>9}{'int8->f32':>11}{'int8->u8':>10}"
          f"{'vs fp32':>9}{'vs bf16':>9}")
    for label, k, n in SHAPES:
        x, w, b = torch.randn(ROWS, k), torch.randn(n, k) * 0.05, torch.randn(n)
        x_scale, x_zp = compute_qparams(x.min(), x.max(), act)
        w_scale, w_zp = compute_qparams(w.amin(1), w.amax(1), weight_spec)
        x_q = qc.quantize(x, x_scale, x_zp, None, 0, 255, torch.uint8)
        w_q = qc.quantize(w, w_scale, w_zp, 0, -128, 127, torch.int8)
        post_op = "gelu" if "gelu" in label else "none"
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        fp32 = median_ms(lambda: F.gelu(F.linear(x, w, b)) if post_op == "gelu" else F.linear(x, w, b))
        bf16 = median_ms(lambda: F.gelu(F.linear(xb, wb, bb)) if post_op == "gelu" else F.linear(xb, wb, bb))
        to_float = median_ms(
            lambda: qc.linear_int8(x_q, x_scale, x_zp, w_q, w_scale, b, None, 1.0, 0, torch.float32, post_op)
        )
        to_uint8 = median_ms(
            lambda: qc.linear_int8(x_q, x_scale, x_zp, w_q, w_scale, b, None, 0.05, 128, torch.uint8, post_op)
        )
        best = min(to_float, to_uint8)
        print(f"{label:<24}{fp32:>9.2f}{bf16:>9.2f}{to_float:>11.2f}{to_uint8:>10.2f}"
              f"{fp32 / best:>8.1f}x{bf16 / best:>8.1f}x")


if __name__ == "__main__":
    main()
