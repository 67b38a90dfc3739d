// qc::attention, the fused attention kernel (attention.cpp says how and why).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qcompile {

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
                     at::ScalarType out_dtype);

// The same attention with its output quantized per tensor: clamp(round(y · m / S) + Z, qmin, qmax)
// as uint8 or int8, m (optional) a multiplier per output channel, [heads · v_depth].
at::Tensor attention_quantize(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
                              const std::optional<at::Tensor>& multiplier, double out_scale, int64_t zero_point,
                              int64_t qmin, int64_t qmax, at::ScalarType dtype);

}  // namespace qcompile
