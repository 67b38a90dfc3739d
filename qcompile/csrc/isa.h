// Which instruction set the native kernels run: the best this CPU has, unless a test asks for the
// portable path (every kernel keeps one, and both are tested on the same machine).
#pragma once

#include <string>

namespace qcompile {

// Portable: plain C++. Avx512: avx512f/dq/bw/vl and FMA.
enum class Isa { Portable, Avx512 };

Isa detected_isa();          // from the CPU's feature flags
Isa active_isa();            // what the kernels use now
void use_isa(Isa isa);       // refuses an ISA the CPU lacks
Isa isa_named(const std::string& name);  // 'portable' or 'avx512'
std::string isa_name(Isa isa);

}  // namespace qcompile
