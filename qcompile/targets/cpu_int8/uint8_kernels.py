"""uint8 kernels for the integer ops between int8 convolutions: ``qc.max_pool2d_uint8``.

ATen's max-pool on uint8 takes a slow generic path (ResNet-18's stem pool, 8 x 64 x 112 x 112:
about 19 ms, against 3 ms for the same pool in fp32), and refuses a channels-last uint8 input
that large. Max-pooling commutes with quantization (a monotone map), so an int8 graph pools
its uint8 bytes; this kernel does it as the elementwise maximum of the ``kh * kw`` strided
views of the input, each over the outputs whose window it falls in (the padding, which never
wins a maximum, is never materialized), which runs at memory speed in any layout.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile.kernel_check import register_kernel


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _tap_range(out_size: int, in_size: int, offset: int, stride: int) -> tuple[int, int]:
    """Output positions ``o`` whose input ``stride * o + offset`` lies inside ``[0, in_size)``."""
    first = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = min(out_size, (in_size - 1 - offset) // stride + 1)
    return first, max(first, last)


@torch.library.custom_op("qc::max_pool2d_uint8", mutates_args=())
def max_pool2d_uint8(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"max_pool2d_uint8 takes a 4-D uint8 tensor, got {x.dtype} {list(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if 2 * ph >= kh or 2 * pw >= kw:
        raise ValueError(f"max_pool2d_uint8: padding {padding} must be less than half of kernel {kernel_size}")
    h, w = x.shape[2:]
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    # The tap at the padding offset is inside the input for every output position (padding is
    # under half the kernel), so it starts the maximum; every other tap updates the outputs
    # whose window it falls in. No padded copy of the input is made.
    out = x[:, :, 0:sh * (oh - 1) + 1:sh, 0:sw * (ow - 1) + 1:sw].clone(memory_format=layout)
    for i in range(kh):
        rows = _tap_range(oh, h, i - ph, sh)
        for j in range(kw):
            if (i, j) == (ph, pw) or rows[0] == rows[1]:
                continue
            cols = _tap_range(ow, w, j - pw, sw)
            if cols[0] == cols[1]:
                continue
            r0, c0 = sh * rows[0] + i - ph, sw * cols[0] + j - pw
            window = x[:, :, r0:r0 + sh * (rows[1] - rows[0] - 1) + 1:sh, c0:c0 + sw * (cols[1] - cols[0] - 1) + 1:sw]
            target = out[:, :, rows[0]:rows[1], cols[0]:cols[1]]
            torch.maximum(target, window, out=target)
    return out


@max_pool2d_uint8.register_fake
def _(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return x.new_empty((n, c, _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)))


def reference_max_pool2d_uint8(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """The contract: ATen's float max-pool on the same bytes (exact: every uint8 is a float32)."""
    return F.max_pool2d(x.float(), kernel_size, stride, padding).to(torch.uint8)


register_kernel(max_pool2d_uint8, reference_max_pool2d_uint8)
