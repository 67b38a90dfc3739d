// qc::attention, the fused attention kernel (attention.cpp says how and why).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qcompile {

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
                     at::ScalarType out_dtype);

}  // namespace qcompile
