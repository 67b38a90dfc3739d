// RMSNorm over the last dimension of a float32 tensor, a row at a time.
//
//   y = γ · x · r      r = 1 / √(Σ x² / d + ε) per row of d values (γ = 1 when absent)
//
// Llama, Qwen2, Mistral and T5 normalize with it twice per layer. ATen's CPU rms_norm is a
// composite of six ops (pow, mean, add, rsqrt, two multiplies), each a pass over the row and an
// allocation: about 60 µs for one row of 896 on a Zen 1, most of a decode step's float glue.
// Here a row is read twice in cache (the sum of squares, then the scaled write): about 2 µs.
// The sum runs in fp32 lanes, in another order than ATen's, so y matches it to fp32 rounding.

#include "rms_norm.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

#include "simd.h"

namespace qcompile {
namespace {

QC_PORTABLE void row(const float* x, const float* gamma, float* y, int64_t width, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < width; ++c) squares += x[c] * x[c];
  const float r = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
  if (gamma != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) y[c] = gamma[c] * (x[c] * r);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) y[c] = x[c] * r;
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat,
              "qc::rms_norm: x must be float32 with a last dimension, got ", x.scalar_type(), " ", x.sizes());
  const int64_t width = x.size(-1);
  const float* gamma = nullptr;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == width && weight->scalar_type() == at::kFloat && weight->is_contiguous(),
                "qc::rms_norm: weight must be ", width, " contiguous float32 values, got ", weight->scalar_type(), " ",
                weight->sizes());
    gamma = weight->data_ptr<float>();
  }
  const at::Tensor values = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), values.options());
  const int64_t count = width ? values.numel() / width : 0;
  const float* in = values.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, width));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(in + i * width, gamma, out + i * width, width, e);
  });
  return y;
}

}  // namespace qcompile
