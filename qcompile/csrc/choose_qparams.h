// qc.choose_qparams_per_token: dynamic per-row quantization parameters, and qc.quantize_per_token:
// those parameters and the rows quantized with them in one pass (choose_qparams.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace qcompile {

// The scale and zero point of a row whose values span [lo, hi] (0 within it; NaN in both for a
// row holding a NaN): the formulas choose_qparams.cpp states, as every per-row kernel takes them.
void range_qparams(float lo, float hi, int64_t qmin, int64_t qmax, bool symmetric, float* scale, int32_t* zero_point);

std::tuple<at::Tensor, at::Tensor> choose_qparams_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                            bool symmetric);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                                  bool symmetric, at::ScalarType dtype);

}  // namespace qcompile
