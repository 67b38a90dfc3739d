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

#include "layer_norm_quantize.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

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
};

template <typename T>
QC_PORTABLE void row_portable(const float* x, float* y, T* q, const Params& p) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < p.width; ++c) sum += x[c];
  const float mean = sum / static_cast<float>(p.width);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < p.width; ++c) squares += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(p.width) + p.eps);
  const float *gamma = p.gamma, *beta = p.beta, *multiplier = p.multiplier;
#pragma omp simd
  for (int64_t c = 0; c < p.width; ++c) {
    float v = (x[c] - mean) * rstd;
    v = gamma ? v * gamma[c] : v;
    v = beta ? v + beta[c] : v;
    y[c] = v;
    q[c] = static_cast<T>(quantize_value(multiplier ? v * multiplier[c] : v, p.scale, p.zero_point, p.qmin, p.qmax));
  }
}

template <typename T>
QC_AVX512 void row_avx512(const float* x, float* y, T* q, const Params& p) {
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
  const __m512 r = _mm512_set1_ps(rstd), s = _mm512_set1_ps(p.scale), z = _mm512_set1_ps(p.zero_point);
  const __m512 lo = _mm512_set1_ps(p.qmin), hi = _mm512_set1_ps(p.qmax);
  for (int64_t c = 0; c < p.width; c += 16) {
    const __mmask16 m = tail_mask(p.width - c);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mu), r);
    if (p.gamma) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.gamma + c));
    if (p.beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p.beta + c));
    _mm512_mask_storeu_ps(y + c, m, v);
    if (p.multiplier) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.multiplier + c));
    store_quantized(q + c, m, v, s, z, lo, hi);
  }
}

template <typename T>
void rows(const float* x, float* y, T* q, int64_t count, const Params& p) {
  const bool avx512 = active_isa() == Isa::Avx512;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, p.width));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (avx512) {
        row_avx512(x + i * p.width, y + i * p.width, q + i * p.width, p);
      } else {
        row_portable(x + i * p.width, y + i * p.width, q + i * p.width, p);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> layer_norm_quantize(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias, double eps,
                                                       const std::optional<at::Tensor>& multiplier, double scale,
                                                       int64_t zero_point, int64_t qmin, int64_t qmax,
                                                       at::ScalarType dtype) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat,
              "qc::layer_norm_quantize: x must be float32 with a last dimension, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, "qc::layer_norm_quantize writes uint8 or int8, got ", dtype);
  const int64_t width = x.size(-1);
  const at::Tensor values = x.contiguous();
  const at::Tensor none;
  const at::Tensor& gamma = weight.has_value() ? *weight : none;
  const at::Tensor& beta = bias.has_value() ? *bias : none;
  const at::Tensor& mult = multiplier.has_value() ? *multiplier : none;
  Params p{width, static_cast<float>(eps), per_channel(gamma, width, "weight"), per_channel(beta, width, "bias"),
           per_channel(mult, width, "multiplier"), static_cast<float>(scale), static_cast<float>(zero_point),
           static_cast<float>(qmin), static_cast<float>(qmax)};
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

}  // namespace qcompile
