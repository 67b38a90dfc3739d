// The few-row uint8 x int8 linear (linear_u8s8.cpp says how and why).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace qcompile {

// (packed weight, column sums) for linear_u8s8, from a [out, in] int8 weight.
std::tuple<at::Tensor, at::Tensor> pack_u8s8_weight(const at::Tensor& weight);

// The longest reduction it takes: its int32 sums and zero-point corrections (at most 255·128 per
// input) cannot overflow below this.
constexpr int64_t kMaxDepth = 65536;

// Whether this CPU has AVX512-VNNI (without it qc.linear_int8 runs oneDNN at every row count).
bool has_vnni();

// Inputs per AMX tile product: linear_u8s8 runs on tiles only where the inputs are a multiple of it.
constexpr int64_t kTileDepth = 64;

// Rows from which it runs on tiles: below a tile's 16 rows the VNNI path is faster (all-MiniLM's four
// linears, AMX Xeon, 2 threads, alternated: 0.08 against 0.20 ms at 1 row, 0.19 against 0.22 at 12,
// 0.25 against 0.22 at 16).
constexpr int64_t kTileMinRows = 16;

// Whether this CPU has AMX-INT8 tiles and the kernel lets the process use them.
bool has_amx();

// Whether linear_u8s8 multiplies on AMX tiles (where it has them, the inputs are a multiple of 64 and
// the rows at least kTileMinRows): on by default where has_amx(); tests turn it off to run the VNNI
// path on the same machine.
bool amx_active();
void use_amx(bool enabled);

// x_scale and x_zero_point hold one element (every row's) or one per row (activations quantized per
// token, each row's own).
at::Tensor linear_u8s8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& packed, const at::Tensor& column_sums, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other,
                       std::string_view post_op,
                       double out_scale, int64_t out_zero_point, at::ScalarType out_dtype);

}  // namespace qcompile
