// Per-tensor quantization of fp32 values to 8-bit integers in one pass (quantize.cpp says how).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace qcompile {

// x[0, n) quantized with one scale and zero point into q, as T (uint8_t or int8_t), on the calling
// thread with the active instruction set: the loop quantize_per_tensor runs on each of its tasks.
template <typename T>
void quantize_span(const float* x, T* q, int64_t n, float scale, float zero_point, float qmin, float qmax);

at::Tensor quantize_per_tensor(const at::Tensor& x, double scale, int64_t zero_point, int64_t qmin, int64_t qmax,
                               at::ScalarType dtype);

}  // namespace qcompile
