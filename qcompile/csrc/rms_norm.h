// qc::rms_norm, RMSNorm over the last dimension in one pass per row (rms_norm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace qcompile {

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps);

}  // namespace qcompile
