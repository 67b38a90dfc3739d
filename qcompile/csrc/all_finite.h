// Whether a tensor holds only finite values, in one read of it (all_finite.cpp).
#pragma once

#include <ATen/ATen.h>

namespace qcompile {

bool all_finite(const at::Tensor& x);

}  // namespace qcompile
