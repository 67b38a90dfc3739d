// Per-tensor quantization of fp32 values to 8-bit integers, and back, in one pass (quantize.cpp says how).
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

// r = (float(q) − float(Z)) · float(S) for uint8 or int8 q, as float32 in q's layout, in one pass:
// the float32 operations qc.dequantize's ATen form performs (a cast, a subtraction, a product), so
// the same bits.
at::Tensor dequantize_per_tensor(const at::Tensor& q, double scale, double zero_point);

}  // namespace qcompile
