// qc.quantize and qc.dequantize: the Q/DQ operators every qcompile graph is written in (qdq.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qcompile {

at::Tensor quantize(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                    std::optional<int64_t> axis, int64_t qmin, int64_t qmax, at::ScalarType dtype);

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point,
                      std::optional<int64_t> axis, at::ScalarType out_dtype);

// A quantization parameter shaped to broadcast against x: along `axis` for per-channel parameters,
// as it is for per-token / per-group ones ([..., 1]), 0-dim for a per-tensor one.
at::Tensor broadcast_param(const at::Tensor& param, const at::Tensor& x, std::optional<int64_t> axis);

}  // namespace qcompile
