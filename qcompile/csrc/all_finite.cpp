// A compiled model refuses inputs with NaN or infinity (a quantized kernel would clamp them to a
// finite number and return a plausible answer). ATen's isfinite(x).all() reads x four times and
// writes two temporaries (eq, abs, ne, and, all), which on a decode step's key/value caches cost
// more than the step's kernels; here each float is read once: finite exactly when its exponent
// bits are not all ones.

#include "all_finite.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cstring>

#include "isa.h"
#include "simd.h"

namespace qcompile {
namespace {

constexpr uint32_t kExponent = 0x7F800000u;
constexpr int64_t kGrain = 1 << 16;

bool finite_portable(const float* x, int64_t n) {
  uint32_t all_ones = 0;  // no early exit: the loop vectorizes, and a non-finite input is the rare case
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    all_ones |= static_cast<uint32_t>((bits & kExponent) == kExponent);
  }
  return all_ones == 0;
}

QC_AVX512 bool finite_avx512(const float* x, int64_t n) {
  const __m512i exponent = _mm512_set1_epi32(static_cast<int>(kExponent));
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512i bits = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + i), exponent);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, bits, exponent);
  }
  return bad == 0;
}

}  // namespace

bool all_finite(const at::Tensor& x) {
  if (!at::isFloatingType(x.scalar_type())) return true;
  if (x.scalar_type() != at::kFloat || !x.is_contiguous() || !x.device().is_cpu()) {
    return at::isfinite(x).all().item<bool>();
  }
  const float* data = x.const_data_ptr<float>();
  const bool avx512 = active_isa() == Isa::Avx512;
  std::atomic<bool> finite{true};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    const bool ok = avx512 ? finite_avx512(data + begin, end - begin) : finite_portable(data + begin, end - begin);
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace qcompile
