// What the native kernels share: padding arithmetic, the AVX-512 target and its tail masks, the
// quantize step q = clamp(round(v / S) + Z, qmin, qmax) (a true division, rounded half to even
// before Z is added, as qc.quantize and ONNX's QuantizeLinear do) in scalar and vector form, and
// a vector e^x.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace qcompile {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The AVX-512 path of every kernel: what isa.cpp requires before it chooses Isa::Avx512.
#define QC_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

// The lanes of the 16-float step starting `remaining` elements before the end.
QC_AVX512 inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// The portable path of a kernel, compiled twice: for AVX2 and for the base x86-64 ISA, the
// loader choosing by CPU. It is plain C++ that the compiler vectorizes (with `omp simd` on its
// reductions and loops), so a CPU without AVX-512 still runs 8-lane code: on a Zen 1 (AVX2) a MiniLM
// LayerNorm + quantize went from 22 ms to 1.9 ms ([4096, 384]; ATen's LayerNorm alone: 1.3), a
// quantize of [4096, 1536] from 55 ms to 3.5.
#define QC_PORTABLE __attribute__((target_clones("avx2", "default")))

// v rounded half to even, for |v| <= 2^22: adding 1.5·2^23 leaves no fraction bits, so the add
// rounds (in the default rounding mode, nearbyint's), and the subtraction is exact. Unlike a call
// to nearbyint it vectorizes.
inline float round_half_even(float v) {
  constexpr float kShift = 12582912.f;  // 1.5 · 2^23
  return (v + kShift) - kShift;
}

// Clamped to [lo, hi] by comparisons, so that it vectorizes; a NaN goes to lo, as the AVX-512
// path's max/min send it.
inline float clamp_value(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

// round(v / S) + Z clamped to [qmin, qmax]. v / S is first held to a step beyond the range, which
// changes no result and keeps it where round_half_even is exact (integer ranges are under 2^17).
inline float quantize_value(float v, float scale, float zero_point, float qmin, float qmax) {
  v = clamp_value(v / scale, qmin - zero_point - 1.f, qmax - zero_point + 1.f);
  return clamp_value(round_half_even(v) + zero_point, qmin, qmax);
}

// quantize_value on 16 lanes, the `m` lanes stored as T (uint8 or int8) at q.
// quantize_value on 16 lanes, as int32 in [qmin, qmax].
QC_AVX512 inline __m512i quantized_lanes(__m512 v, __m512 scale, __m512 zero_point, __m512 qmin, __m512 qmax) {
  v = _mm512_roundscale_ps(_mm512_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zero_point), qmin), qmax));
}

template <typename T>
QC_AVX512 inline void store_quantized(T* q, __mmask16 m, __m512 v, __m512 scale, __m512 zero_point, __m512 qmin,
                                      __m512 qmax) {
  const __m512i k = quantized_lanes(v, scale, zero_point, qmin, qmax);
  if constexpr (std::is_same_v<T, uint8_t>) {
    _mm_mask_storeu_epi8(q, m, _mm512_cvtusepi32_epi8(k));
  } else {
    _mm_mask_storeu_epi8(q, m, _mm512_cvtsepi32_epi8(k));
  }
}

// e^x for x <= 0, to about 1 ulp: x = n·ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial,
// scaled by 2^n. Inputs below -87.3 (e^x under float's normal range, -inf included) give exactly 0,
// as std::exp's result does after a sum (a softmax's, or sigmoid's 1 + e^x).
QC_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 underflow = _mm512_set1_ps(-87.3f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, underflow, _CMP_LT_OQ);
  x = _mm512_max_ps(x, underflow);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), y, n);
}

}  // namespace qcompile
