// qc.linear_weight_only: int8 or int4 weights, bf16 activations, fp32 accumulation (weight_only.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace qcompile {

// From this many rows on, the weight is dequantized to bf16 and oneDNN's bf16 GEMM runs it: the
// weight-only kernels are matrix-vector kernels (weight_only.cpp's table).
constexpr int64_t kGemvRows = 32;

at::Tensor linear_weight_only(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& scale,
                              const std::optional<at::Tensor>& zero_point, int64_t group_size,
                              const std::optional<at::Tensor>& bias, std::string_view kernel);

bool has_avx512_bf16();  // whether this CPU has AVX512-BF16 (vdpbf16ps), which the int4 kernel uses

}  // namespace qcompile
