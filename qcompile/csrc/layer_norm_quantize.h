// qc::layer_norm_quantize and qc::layer_norm_quantize_per_token: LayerNorm and the following quantize
// in one pass (layer_norm_quantize.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace qcompile {

std::tuple<at::Tensor, at::Tensor> layer_norm_quantize(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias, double eps,
                                                       const std::optional<at::Tensor>& multiplier, double scale,
                                                       int64_t zero_point, int64_t qmin, int64_t qmax,
                                                       at::ScalarType dtype);

// The same with each row's S and Z chosen from its own y·m (per token): (y, q, S, Z), S and Z [..., 1].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_quantize_per_token(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    const std::optional<at::Tensor>& multiplier, int64_t qmin, int64_t qmax, bool symmetric, at::ScalarType dtype);

}  // namespace qcompile
