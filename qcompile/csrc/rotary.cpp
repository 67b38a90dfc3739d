// Rotary position embedding, as transformers' Llama / Qwen2 / Mistral apply it to queries and keys:
//
//   y = x ⊙ c + rotate_half(x) ⊙ s        rotate_half(x) = [−x[h:], x[:h]],  h = d / 2
//   y[i]     = x[i] · c[i]         − x[i + h] · s[i]            i < h
//   y[i + h] = x[i + h] · c[i + h] + x[i] · s[i + h]
//
// over the last dimension d, c and s broadcast over the leading ones (one per position, shared
// by the heads). Written out it is seven ATen calls (two slices, a negation, a concatenation,
// two multiplies, an add) with four temporaries, for each of the query and the key of every
// layer: about 14 dispatches a layer, most of a decode step's time at batch 1. Here each row is
// read once and written once. Products and sums are the same fp32 operations as the written-out
// form, in the same order, rounded once each (no fused multiply-add), so y is bit for bit its value.

#include "rotary.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace qcompile {
namespace {

// One row: d values of x, c and s (each dense along the row) into y.
__attribute__((optimize("fp-contract=off"))) void row(const float* x, const float* c, const float* s, float* y,
                                                      int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * c[i];
    const float b = -x[i + half] * s[i];
    y[i] = a + b;
  }
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i + half] * c[i + half];
    const float b = x[i] * s[i + half];
    y[i + half] = a + b;
  }
}

// The element offset of row `r` (an index over the leading dimensions, row-major) in a tensor
// with these leading `strides`.
int64_t offset(int64_t r, const std::vector<int64_t>& sizes, const at::IntArrayRef strides) {
  int64_t at = 0;
  for (int64_t dim = static_cast<int64_t>(sizes.size()) - 1; dim >= 0; --dim) {
    at += (r % sizes[dim]) * strides[dim];
    r /= sizes[dim];
  }
  return at;
}

}  // namespace

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "qc::rotary: x must be float32, got ", x.scalar_type(),
              " ", x.sizes());
  const int64_t width = x.size(-1);
  TORCH_CHECK(width % 2 == 0, "qc::rotary: x's last dimension must be even, got ", width);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(-1) == width,
                "qc::rotary: cos and sin must be float32 with x's last dimension ", width, ", got ", t->scalar_type(),
                " ", t->sizes());
  }
  // Broadcast c and s to x's shape (stride 0 where they repeat) and make every row dense.
  const at::Tensor xs = x.stride(-1) == 1 ? x : x.contiguous();
  const auto dense = [&](const at::Tensor& t) {
    TORCH_CHECK(t.dim() <= x.dim(), "qc::rotary: cos and sin must broadcast to x's shape ", x.sizes(), ", got ",
                t.sizes());
    const at::Tensor rows = t.stride(-1) == 1 ? t : t.contiguous();
    return rows.expand(x.sizes());
  };
  const at::Tensor c = dense(cos), s = dense(sin);
  at::Tensor y = at::empty(x.sizes(), xs.options().memory_format(at::MemoryFormat::Contiguous));
  const std::vector<int64_t> leading(x.sizes().begin(), x.sizes().end() - 1);
  int64_t rows = 1;
  for (const int64_t size : leading) rows *= size;
  const float *xp = xs.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto xs_strides = xs.strides(), c_strides = c.strides(), s_strides = s.strides();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, width));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row(xp + offset(r, leading, xs_strides), cp + offset(r, leading, c_strides), sp + offset(r, leading, s_strides),
          yp + r * width, width / 2);
    }
  });
  return y;
}

}  // namespace qcompile
