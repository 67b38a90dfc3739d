// Max-pooling of uint8 activations between int8 convolutions (max_pool2d_uint8.cpp).
#pragma once

#include <ATen/ATen.h>

namespace qcompile {

at::Tensor max_pool2d_uint8(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding);

}  // namespace qcompile
