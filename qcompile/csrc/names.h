// Names the native operators' error messages use, spelled as Python prints them.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace qcompile {

// "torch.float32", not ATen's "Float": the error reads like the Python the user wrote.
inline std::string dtype_name(c10::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

}  // namespace qcompile
