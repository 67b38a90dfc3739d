// qc.choose_qparams_per_token: a scale and zero point per row of x (over its last dimension),
// shaped [..., 1], from the row's own range widened to contain 0 (lo <= 0 <= hi):
//
//   symmetric:  S = max(max(−lo, hi) / ((qmax − qmin) div 2), eps)    Z = (qmin + qmax + 1) div 2
//   affine:     S = max((hi − lo) / (qmax − qmin), eps)               Z = clamp(qmin − round(lo / S), qmin, qmax)
//
// with eps fp32's machine epsilon and round half to even: the fp32 operations, in this order, of
// qcompile.spec.integer_qparams, so the parameters are the same bits. Native because a dynamic
// per-token linear calls it on every forward: as a Python operator over ATen ops it cost 0.17 ms
// a call on a 1 x 896 row (AMD Zen 1), more than the int4 kernel that follows it.
// A row holding a NaN gets a NaN scale (and zero point qmin), as ATen's min/max propagate it.
//
// qc.quantize_per_token also quantizes each row with its parameters while the row is in cache,
// q = clamp(round(x / S) + Z, qmin, qmax) as qc.quantize computes it (the same integers): the
// pair choose_qparams_per_token → quantize of a dynamic linear's input in one call and one read.

#include "choose_qparams.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "isa.h"
#include "quantize.h"
#include "simd.h"

namespace qcompile {
namespace {

// The range [lo, hi] of n values, widened to contain 0; NaN in both when one is NaN.
QC_PORTABLE void row_range(const float* x, int64_t n, float* lo_out, float* hi_out) {
  float lo = 0.0f, hi = 0.0f;
  bool nan = false;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
  for (int64_t k = 0; k < n; ++k) {
    lo = x[k] < lo ? x[k] : lo;
    hi = x[k] > hi ? x[k] : hi;
    nan |= x[k] != x[k];
  }
  *lo_out = nan ? std::numeric_limits<float>::quiet_NaN() : lo;
  *hi_out = nan ? std::numeric_limits<float>::quiet_NaN() : hi;
}

// row_range 32 lanes at a time in two independent chains (the compiler leaves the portable loop's
// reductions scalar: a [4096, 384] batch of rows took 0.61 ms, this 0.1). Lanes past the end read
// 0, inside the widened range already; min and max are exact, so the range is the same bits.
QC_AVX512 void row_range_avx512(const float* x, int64_t n, float* lo_out, float* hi_out) {
  __m512 lo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, hi[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __mmask16 nan = 0;
  for (int64_t k = 0; k < n; k += 32) {
    for (int c = 0; c < 2; ++c) {
      const int64_t left = n - k - 16 * c;
      const __m512 v = _mm512_maskz_loadu_ps(left > 0 ? tail_mask(left) : 0, x + k + 16 * c);
      lo[c] = _mm512_min_ps(lo[c], v);
      hi[c] = _mm512_max_ps(hi[c], v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
  }
  const float quiet_nan = std::numeric_limits<float>::quiet_NaN();
  *lo_out = nan ? quiet_nan : _mm512_reduce_min_ps(_mm512_min_ps(lo[0], lo[1]));
  *hi_out = nan ? quiet_nan : _mm512_reduce_max_ps(_mm512_max_ps(hi[0], hi[1]));
}

// One row's scale and zero point (the formulas above).
void row_qparams(const float* row, int64_t depth, int64_t qmin, int64_t qmax, bool symmetric, float* scale,
                 int32_t* zero_point) {
  float lo, hi;
  if (active_isa() == Isa::Avx512) {
    row_range_avx512(row, depth, &lo, &hi);
  } else {
    row_range(row, depth, &lo, &hi);
  }
  range_qparams(lo, hi, qmin, qmax, symmetric, scale, zero_point);
}

// x as dense fp32 rows, and the [..., 1] shape of its per-row parameters.
std::pair<at::Tensor, std::vector<int64_t>> rows_of(const at::Tensor& x, int64_t qmin, int64_t qmax, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.is_floating_point(), op, " takes a float tensor with a last dimension, got ",
                    x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK_VALUE(qmin < qmax, op, ": qmin ", qmin, " is not below qmax ", qmax);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = 1;
  return {x.to(at::kFloat).contiguous(), shape};
}

int64_t row_grain(int64_t depth) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(depth, 1)); }

template <typename T>
void quantize_rows(const float* in, T* q, float* s, int32_t* z, int64_t count, int64_t depth, int64_t qmin,
                   int64_t qmax, bool symmetric) {
  at::parallel_for(0, count, row_grain(depth), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row_qparams(in + r * depth, depth, qmin, qmax, symmetric, s + r, z + r);
      quantize_span(in + r * depth, q + r * depth, depth, s[r], static_cast<float>(z[r]), static_cast<float>(qmin),
                    static_cast<float>(qmax));
    }
  });
}

}  // namespace

void range_qparams(float lo, float hi, int64_t qmin, int64_t qmax, bool symmetric, float* scale, int32_t* zero_point) {
  const float eps = std::numeric_limits<float>::epsilon(), lo_q = static_cast<float>(qmin), hi_q = static_cast<float>(qmax);
  if (symmetric) {
    const float amax = std::max(-lo, hi), step = std::isnan(lo) ? lo : amax / static_cast<float>((qmax - qmin) / 2);
    *scale = std::isnan(step) ? step : std::max(step, eps);
    *zero_point = static_cast<int32_t>(std::floor((qmin + qmax + 1) / 2.0));  // Python's floor division
  } else {
    const float step = (hi - lo) / static_cast<float>(qmax - qmin);
    *scale = std::isnan(step) ? step : std::max(step, eps);
    const float offset = lo_q - std::nearbyint(lo / *scale);
    *zero_point = std::isnan(offset) ? static_cast<int32_t>(qmin) : static_cast<int32_t>(clamp_value(offset, lo_q, hi_q));
  }
}

std::tuple<at::Tensor, at::Tensor> choose_qparams_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                            bool symmetric) {
  const auto [rows, shape] = rows_of(x, qmin, qmax, "choose_qparams_per_token");
  const int64_t depth = x.size(-1);
  at::Tensor scale = at::empty(shape, rows.options());
  at::Tensor zero_point = at::empty(shape, rows.options().dtype(at::kInt));
  const float* in = rows.const_data_ptr<float>();
  float* s = scale.data_ptr<float>();
  int32_t* z = zero_point.data_ptr<int32_t>();
  at::parallel_for(0, scale.numel(), row_grain(depth), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_qparams(in + r * depth, depth, qmin, qmax, symmetric, s + r, z + r);
  });
  return {scale, zero_point};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                                  bool symmetric, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kByte || dtype == at::kChar, "quantize_per_token writes uint8 or int8, got ", dtype);
  const int64_t lowest = dtype == at::kByte ? 0 : -128, highest = dtype == at::kByte ? 255 : 127;
  TORCH_CHECK_VALUE(lowest <= qmin && qmax <= highest, "quantize_per_token: range [", qmin, ", ", qmax,
                    "] does not fit ", dtype);
  const auto [rows, shape] = rows_of(x, qmin, qmax, "quantize_per_token");
  const int64_t depth = x.size(-1);
  at::Tensor scale = at::empty(shape, rows.options());
  at::Tensor zero_point = at::empty(shape, rows.options().dtype(at::kInt));
  at::Tensor q = at::empty(x.sizes(), rows.options().dtype(dtype));
  const float* in = rows.const_data_ptr<float>();
  if (dtype == at::kByte) {
    quantize_rows(in, q.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero_point.data_ptr<int32_t>(), scale.numel(),
                  depth, qmin, qmax, symmetric);
  } else {
    quantize_rows(in, q.data_ptr<int8_t>(), scale.data_ptr<float>(), zero_point.data_ptr<int32_t>(), scale.numel(),
                  depth, qmin, qmax, symmetric);
  }
  return {q, scale, zero_point};
}

}  // namespace qcompile
