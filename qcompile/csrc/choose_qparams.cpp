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

#include "choose_qparams.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> choose_qparams_per_token(const at::Tensor& x, int64_t qmin, int64_t qmax,
                                                            bool symmetric) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.is_floating_point(), "choose_qparams_per_token takes a float tensor with a last "
                    "dimension, got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK_VALUE(qmin < qmax, "choose_qparams_per_token: qmin ", qmin, " is not below qmax ", qmax);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const int64_t depth = shape.back();
  shape.back() = 1;
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  at::Tensor scale = at::empty(shape, rows.options());
  at::Tensor zero_point = at::empty(shape, rows.options().dtype(at::kInt));
  const int64_t count = scale.numel();
  const float* in = rows.const_data_ptr<float>();
  float* s = scale.data_ptr<float>();
  int32_t* z = zero_point.data_ptr<int32_t>();
  const float eps = std::numeric_limits<float>::epsilon(), lo_q = static_cast<float>(qmin), hi_q = static_cast<float>(qmax);
  at::parallel_for(0, count, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(depth, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float lo, hi;
      row_range(in + r * depth, depth, &lo, &hi);
      if (symmetric) {
        const float amax = std::max(-lo, hi), step = std::isnan(lo) ? lo : amax / static_cast<float>((qmax - qmin) / 2);
        s[r] = std::isnan(step) ? step : std::max(step, eps);
        z[r] = static_cast<int32_t>(std::floor((qmin + qmax + 1) / 2.0));  // Python's floor division
      } else {
        const float step = (hi - lo) / static_cast<float>(qmax - qmin);
        s[r] = std::isnan(step) ? step : std::max(step, eps);
        const float offset = lo_q - std::nearbyint(lo / s[r]);
        z[r] = std::isnan(offset) ? static_cast<int32_t>(qmin) : static_cast<int32_t>(clamp_value(offset, lo_q, hi_q));
      }
    }
  });
  return {scale, zero_point};
}

}  // namespace qcompile
