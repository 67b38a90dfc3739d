// A lowered graph as one native call (program.cpp): its nodes as a list of dispatcher calls over
// value slots, run in C++ without a Python frame per node.
#pragma once

#include <torch/extension.h>

namespace qcompile {

// Adds the Program class to the extension module.
void bind_program(pybind11::module& module);

}  // namespace qcompile
