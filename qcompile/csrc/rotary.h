// qc::rotary, rotary position embedding applied to a query or key in one pass (rotary.cpp).
#pragma once

#include <ATen/ATen.h>

namespace qcompile {

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace qcompile
