#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace qcompile {
namespace {

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{detected_isa()};
  return isa;
}

}  // namespace

Isa detected_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Portable;
}

Isa active_isa() { return active().load(std::memory_order_relaxed); }

void use_isa(Isa isa) {
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(detected_isa()), "qcompile native kernels: this CPU has no ",
              isa_name(isa), " (it has ", isa_name(detected_isa()), ")");
  active().store(isa, std::memory_order_relaxed);
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Portable: break;
  }
  return "portable";
}

Isa isa_named(const std::string& name) {
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (isa_name(isa) == name) return isa;
  }
  TORCH_CHECK(false, "qcompile native kernels: no instruction set '", name,
              "' (they are 'portable', 'avx2' and 'avx512')");
}

}  // namespace qcompile
