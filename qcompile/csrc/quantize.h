// Per-tensor quantization of fp32 values to 8-bit integers in one pass (quantize.cpp says how).
#pragma once

#include <ATen/ATen.h>

namespace qcompile {

at::Tensor quantize_per_tensor(const at::Tensor& x, double scale, int64_t zero_point, int64_t qmin, int64_t qmax,
                               at::ScalarType dtype);

}  // namespace qcompile
