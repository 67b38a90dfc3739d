// LayerNorm over the last dimension and the quantize of the int8 linear that reads it, in one pass.
//
//   y = (x − mean) · rstd · γ + β              rstd = 1 / √(var + ε), biased variance, per row
//   q = clamp(round(y · m / S) + Z, qmin, qmax)  m: outlier smoothing's per-channel multiplier (or 1)
//
// A transformer block's LayerNorm output is read twice: in float by the residual add, and
// quantized by the next int8 linear, with smoothing's multiply before the quantize. As ATen ops
// that is three passes over the activation (norm, multiply, quantize) and a temporary; here each
// row is normalized in cache and written once as y and once as q. The mean and variance are
// two-pass sums over the row in fp32, so y matches ATen's LayerNorm to fp32 rounding, and q is
// the quantize of y·m with a true division by S, rounded half to even.
//
// qc.layer_norm_quantize_per_token is the same for a linear whose activations are quantized per
// token at run time: S and Z are each row's own, from the range of its y·m (widened to contain 0,
// choose_qparams.cpp's formulas), taken while the row is written; the row is then quantized from
// y, still in cache. It replaces LayerNorm, the multiply and qc.quantize_per_token: four passes.

#include "layer_norm_quantize.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "choose_qparams.h"
#include "isa.h"
#include "simd.h"

namespace qcompile {
namespace {

struct Params {
  int64_t width;
  float eps;
  const float* gamma;       // or nullptr
  const float* beta;        // or nullptr
  const float* multiplier;  // or nullptr
  float scale, zero_point, qmin, qmax;
  // Per token: each row's S and Z chosen from its y·m and written here (nullptr: S, Z above).
  float* scales = nullptr;
  int32_t* zero_points = nullptr;
  bool symmetric = false;
};

// A row's y·m quantized with its own parameters, chosen from [lo, hi] (NaN when y·m holds one):
// row r's S and Z are written to p.scales[r], p.zero_points[r] and returned.
std::pair<float, float> row_parameters(float lo, float hi, bool nan, int64_t r, const Params& p) {
  const float missing = std::numeric_limits<float>::quiet_NaN();
  range_qparams(nan ? missing : lo, nan ? missing : hi, static_cast<int64_t>(p.qmin), static_cast<int64_t>(p.qmax),
                p.symmetric, p.scales + r, p.zero_points + r);
  return {p.scales[r], static_cast<float>(p.zero_points[r])};
}

template <typename T>
QC_PORTABLE void row_portable(const float* x, float* y, T* q, int64_t r, const Params& p) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < p.width; ++c) sum += x[c];
  const float mean = sum / static_cast<float>(p.width);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < p.width; ++c) squares += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(p.width) + p.eps);
  const float *gamma = p.gamma, *beta = p.beta, *multiplier = p.multiplier;
  if (p.scales) {
    float lo = 0.f, hi = 0.f;
    bool nan = false;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
    for (int64_t c = 0; c < p.width; ++c) {
      float v = (x[c] - mean) * rstd;
      v = gamma ? v * gamma[c] : v;
      v = beta ? v + beta[c] : v;
      y[c] = v;
      const float m = multiplier ? v * multiplier[c] : v;
      lo = m < lo ? m : lo;
      hi = m > hi ? m : hi;
      nan |= m != m;
    }
    const auto [scale, zero_point] = row_parameters(lo, hi, nan, r, p);
#pragma omp simd
    for (int64_t c = 0; c < p.width; ++c) {
      q[c] = static_cast<T>(quantize_value(multiplier ? y[c] * multiplier[c] : y[c], scale, zero_point, p.qmin, p.qmax));
    }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < p.width; ++c) {
    float v = (x[c] - mean) * rstd;
    v = gamma ? v * gamma[c] : v;
    v = beta ? v + beta[c] : v;
    y[c] = v;
    q[c] = static_cast<T>(quantize_value(multiplier ? v * multiplier[c] : v, p.scale, p.zero_point, p.qmin, p.qmax));
  }
}

// Lanes c .. c + 15 (mask m) of a row normalized with its mean μ and 1/σ, γ and β applied: y's
// values, stored at y + c, returned times smoothing's multiplier s where there is one (what is quantized).
QC_AVX512 inline __m512 normalized(const float* x, float* y, int64_t c, __mmask16 m, __m512 mu, __m512 inv,
                                   const Params& p) {
  __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mu), inv);
  if (p.gamma) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.gamma + c));
  if (p.beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p.beta + c));
  _mm512_mask_storeu_ps(y + c, m, v);
  return p.multiplier ? _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.multiplier + c)) : v;
}

template <typename T>
QC_AVX512 void row_avx512(const float* x, float* y, T* q, int64_t r, const Params& p) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.width; c += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(tail_mask(p.width - c), x + c));
  const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(p.width);
  const __m512 mu = _mm512_set1_ps(mean);
  __m512 squares = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.width; c += 16) {
    const __mmask16 m = tail_mask(p.width - c);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + c), mu);
    squares = _mm512_fmadd_ps(d, d, squares);
  }
  const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(p.width) + p.eps);
  const __m512 inv = _mm512_set1_ps(rstd), lo = _mm512_set1_ps(p.qmin), hi = _mm512_set1_ps(p.qmax);
  if (p.scales) {
    __m512 least = _mm512_setzero_ps(), most = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < p.width; c += 16) {
      const __mmask16 m = tail_mask(p.width - c);
      const __m512 v = normalized(x, y, c, m, mu, inv, p);
      least = _mm512_mask_min_ps(least, m, least, v);  // lanes past the row's end take no part
      most = _mm512_mask_max_ps(most, m, most, v);
      nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    }
    const auto [scale, zero_point] =
        row_parameters(_mm512_reduce_min_ps(least), _mm512_reduce_max_ps(most), nan != 0, r, p);
    const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero_point);
    for (int64_t c = 0; c < p.width; c += 16) {
      const __mmask16 m = tail_mask(p.width - c);
      __m512 v = _mm512_maskz_loadu_ps(m, y + c);
      if (p.multiplier) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.multiplier + c));
      store_quantized(q + c, m, v, s, z, lo, hi);
    }
    return;
  }
  const __m512 s = _mm512_set1_ps(p.scale), z = _mm512_set1_ps(p.zero_point);
  for (int64_t c = 0; c < p.width; c += 16) {
    const __mmask16 m = tail_mask(p.width - c);
    store_quantized(q + c, m, normalized(x, y, c, m, mu, inv, p), s, z, lo, hi);
  }
}

template <typename T>
void rows(const float* x, float* y, T* q, int64_t count, const Params& p) {
  const bool avx512 = active_isa() == Isa::Avx512;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, p.width));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (avx512) {
        row_avx512(x + i * p.width, y + i * p.width, q + i * p.width, i, p);
      } else {
        row_portable(x + i * p.width, y + i * p.width, q + i * p.width, i, p);
      }
    }
  });
}

const float* per_channel(const at::Tensor& t, int64_t width, const char* name) {
  if (!t.defined()) return nullptr;
  TORCH_CHECK(t.numel() == width && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "qc::layer_norm_quantize: ", name, " must be ", width, " contiguous float32 values");
  return t.data_ptr<float>();
}


// The checks, buffers and parallel rows both operators share; `per_token` holds each row's S and Z
// when they are chosen per row (p.scales then points into it).
std::pair<at::Tensor, at::Tensor> normalize_and_quantize(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias, double eps,
                                                         const std::optional<at::Tensor>& multiplier, Params p,
                                                         at::ScalarType dtype, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, op, ": x must be float32 with a last dimension, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, op, " writes uint8 or int8, got ", dtype);
  const int64_t width = x.size(-1);
  const at::Tensor values = x.contiguous();
  const at::Tensor none;
  p.width = width;
  p.eps = static_cast<float>(eps);
  p.gamma = per_channel(weight.has_value() ? *weight : none, width, "weight");
  p.beta = per_channel(bias.has_value() ? *bias : none, width, "bias");
  p.multiplier = per_channel(multiplier.has_value() ? *multiplier : none, width, "multiplier");
  at::Tensor y = at::empty(x.sizes(), values.options());
  at::Tensor q = at::empty(x.sizes(), values.options().dtype(dtype));
  const int64_t count = width ? values.numel() / width : 0;
  if (dtype == at::kByte) {
    rows(values.data_ptr<float>(), y.data_ptr<float>(), q.data_ptr<uint8_t>(), count, p);
  } else {
    rows(values.data_ptr<float>(), y.data_ptr<float>(), q.data_ptr<int8_t>(), count, p);
  }
  return {y, q};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> layer_norm_quantize(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias, double eps,
                                                       const std::optional<at::Tensor>& multiplier, double scale,
                                                       int64_t zero_point, int64_t qmin, int64_t qmax,
                                                       at::ScalarType dtype) {
  Params p{};
  p.scale = static_cast<float>(scale), p.zero_point = static_cast<float>(zero_point);
  p.qmin = static_cast<float>(qmin), p.qmax = static_cast<float>(qmax);
  return normalize_and_quantize(x, weight, bias, eps, multiplier, p, dtype, "qc::layer_norm_quantize");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_quantize_per_token(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    const std::optional<at::Tensor>& multiplier, int64_t qmin, int64_t qmax, bool symmetric, at::ScalarType dtype) {
  TORCH_CHECK(qmin < qmax, "qc::layer_norm_quantize_per_token: qmin ", qmin, " is not below qmax ", qmax);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty(), "qc::layer_norm_quantize_per_token: x must have a last dimension");
  shape.back() = 1;
  at::Tensor scale = at::empty(shape, x.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty(shape, x.options().dtype(at::kInt));
  Params p{};
  p.qmin = static_cast<float>(qmin), p.qmax = static_cast<float>(qmax), p.symmetric = symmetric;
  p.scales = scale.data_ptr<float>(), p.zero_points = zero_point.data_ptr<int32_t>();
  auto [y, q] = normalize_and_quantize(x, weight, bias, eps, multiplier, p, dtype, "qc::layer_norm_quantize_per_token");
  return {y, q, scale, zero_point};
}

}  // namespace qcompile
