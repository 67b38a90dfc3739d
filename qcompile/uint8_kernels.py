"""uint8 kernels for the integer ops between int8 convolutions: ``qc.max_pool2d_uint8``.

ATen's max-pool on uint8 takes a slow generic path (ResNet-18's stem pool, 8 x 64 x 112 x 112:
about 19 ms, against 3 ms for the same pool in fp32), and refuses a channels-last uint8 input
that large. Max-pooling commutes with quantization (a monotone map), so an int8 graph pools
its uint8 bytes; this kernel does it as the elementwise maximum of the ``kh * kw`` strided
views of the zero-padded input, which runs at memory speed in any layout. Zero is the
smallest uint8, so zero padding never wins a window that holds a real value.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.custom_op("qc::max_pool2d_uint8", mutates_args=())
def max_pool2d_uint8(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"max_pool2d_uint8 takes a 4-D uint8 tensor, got {x.dtype} {list(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, c, h, w = x.shape
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    padded = x
    if ph or pw:
        padded = torch.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                             memory_format=layout).zero_()
        padded[:, :, ph:ph + h, pw:pw + w] = x
    out = None
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out = window.clone(memory_format=layout) if out is None else torch.maximum(out, window, out=out)
    return out


@max_pool2d_uint8.register_fake
def _(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return x.new_empty((n, c, _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)))
