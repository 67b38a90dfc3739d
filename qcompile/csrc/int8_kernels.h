// qc.linear_int8 and qc.conv2d_int8: the int8 kernels lower-cpu-int8 rewrites Q/DQ groups into
// (int8_kernels.cpp states their contract and how each call is run).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace qcompile {

// Rows up to which linear_int8 runs the native VNNI kernel instead of oneDNN.
constexpr int64_t kFewRows = 16;

// Rows up to which linear_int8 runs the u8s8 kernel on AMX tiles instead of oneDNN, where it has them
// and the inputs are a multiple of 64. Measured (AMX Xeon, 2 threads, alternated, `python -m
// benchmarks.native_kernels`), all-MiniLM's four linears at 64 rows: 0.46 ms against oneDNN's 0.72;
// at 128: 0.84 against 1.31; at 256: 1.41 against 2.04; from 1024 rows oneDNN is as fast or faster
// (7.08 against 7.75 ms).
constexpr int64_t kTiledRows = 256;

// Multiply-adds up to which conv2d_int8 (ungrouped, no residual add) runs as im2col and the VNNI
// kernel instead of oneDNN, whose fixed cost is about 40 µs a call. Measured (2 threads, Zen 4):
// 16x8x4x4 -> 16 channels, 3x3 (2^18 MACs): 19 µs against 42; 16x1x8x8 -> 8 (2^16): 49 against
// 54; from 2^24 on oneDNN is 2-4 times faster.
constexpr int64_t kSmallConvMacs = int64_t{1} << 20;

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& other, double out_scale, int64_t out_zero_point,
                       at::ScalarType out_dtype, std::string_view post_op);

at::Tensor conv2d_int8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& other, double other_scale, int64_t other_zero_point,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       double out_scale, int64_t out_zero_point, at::ScalarType out_dtype, std::string_view post_op);

}  // namespace qcompile
