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

// An int4 weight [out, in / g, g] (int8 storage, values in [-8, 7]; a ValueError naming `op` otherwise) as the
// int4 kernels read it: [out, in' / 2] bytes, in' = in rounded up to 64 (padding u = 8, q = 0).
// A byte holds two weights u = q + 8 in [0, 16): byte i of a row's 32-byte chunk c holds
// k = 64c + i in its low nibble and k = 64c + 32 + i in its high one, so a chunk's two halves
// unpack lane-aligned with x's natural order by a mask or a shift.
at::Tensor int4_nibbles(const at::Tensor& weight_q, std::string_view op);

// The int4pack weight's shapes: [out, in / g, g] with g a multiple of 32 and one scale per group;
// a ValueError naming `op` otherwise.
void check_int4pack(const at::Tensor& weight_q, const at::Tensor& scale, int64_t group_size, std::string_view op);

}  // namespace qcompile
