"""uint8 kernels for the integer ops between int8 convolutions: ``qc.max_pool2d_uint8``.

Max-pooling commutes with quantization (a monotone map), so an int8 graph pools its uint8
bytes. ATen's max-pool on uint8 takes a slow generic path (ResNet-18's stem pool, 8 x 64 x 112
x 112: about 19 ms, against 3 ms for the same pool in fp32) and refuses a channels-last uint8
input that large; the native kernel (``qcompile/csrc/max_pool2d_uint8.cpp``) reads each window's
taps inside the input (padding, which never wins a maximum, is never materialized) and keeps the
input's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile import native  # noqa: F401  (loads the extension, which defines the kernel)
from qcompile.kernel_check import register_kernel

max_pool2d_uint8 = torch.ops.qc.max_pool2d_uint8.default


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.register_fake("qc::max_pool2d_uint8")
def _(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return x.new_empty((n, c, _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)))


def reference_max_pool2d_uint8(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """The contract: ATen's float max-pool on the same bytes (exact: every uint8 is a float32)."""
    return F.max_pool2d(x.float(), kernel_size, stride, padding).to(torch.uint8)


register_kernel(max_pool2d_uint8, reference_max_pool2d_uint8)
