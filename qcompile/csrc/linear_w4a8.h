// qc.linear_w4a8: int4 weights in groups times uint8 activations, in integers (linear_w4a8.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qcompile {

at::Tensor linear_w4a8(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight_q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                       int64_t group_size, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

// Whether linear_w4a8 runs the integer kernel on the active instruction set: AVX2, and not AVX512-BF16's
// int4 kernel (on avx512 with AVX512-BF16 and on portable it runs linear_weight_only on x dequantized).
bool w4a8_in_integers();

}  // namespace qcompile
