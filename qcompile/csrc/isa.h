// Which instruction set the native kernels run: the best this CPU has, unless a test asks for the
// portable path (every kernel keeps one, and both are tested on the same machine).
#pragma once

#include <string>

namespace qcompile {

// Portable: plain C++. Avx2: AVX2 and FMA (the kernels that have such a path; the others run their
// portable one there). Avx512: avx512f/dq/bw/vl and FMA. Each level has the ones below it.
enum class Isa { Portable, Avx2, Avx512 };

Isa detected_isa();          // from the CPU's feature flags
Isa active_isa();            // what the kernels use now
void use_isa(Isa isa);       // refuses an ISA the CPU lacks
Isa isa_named(const std::string& name);  // 'portable', 'avx2' or 'avx512'
std::string isa_name(Isa isa);

}  // namespace qcompile
