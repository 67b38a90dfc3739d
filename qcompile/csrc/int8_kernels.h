// qc.linear_int8 and qc.conv2d_int8: the int8 kernels lower-cpu-int8 rewrites Q/DQ groups into
// (int8_kernels.cpp states their contract and how each call is run).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace qcompile {

// Rows up to which linear_int8 runs the native VNNI kernel instead of oneDNN.
constexpr int64_t kFewRows = 16;

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
