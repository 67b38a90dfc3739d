// qc.choose_qparams_per_token: dynamic per-row quantization parameters, and qc.quantize_per_token:
// those parameters and the rows quantized with them in one pass (choose_qparams.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace qcompile {

std::tuple<at::Tensor, at::Tensor> choose_qparams_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                            bool symmetric);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                                  bool symmetric, at::ScalarType dtype);

}  // namespace qcompile
