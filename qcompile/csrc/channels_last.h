// uint8 activations in the channels-last order oneDNN's int8 convolutions read (channels_last.cpp).
#pragma once

#include <ATen/ATen.h>

namespace qcompile {

// x itself when it is already channels-last contiguous, else a channels-last copy of it.
at::Tensor channels_last_bytes(const at::Tensor& x);

// qc.quantize(x, scale, zero_point, None, 0, 255, uint8) of 4-D float values, channels-last.
at::Tensor quantize_channels_last(const at::Tensor& x, double scale, int64_t zero_point);

}  // namespace qcompile
