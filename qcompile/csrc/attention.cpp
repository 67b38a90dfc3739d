// qc::attention: softmax(Q·Kᵀ·scale + mask)·V for one (batch, head) at a time, in one pass.
//
// The float part of an int8 transformer spends most of its time in attention when it is run as
// ATen ops: a batched matmul writes every score to memory, a mask add and a softmax read and
// write them again, and a second batched matmul reads them back (all-MiniLM at 32 x 128: 12.6 MB
// of scores per layer, passed over four times). Here one task owns one head: it packs Kᵀ and V
// into cache-sized buffers, computes a few query rows' scores, masks and normalizes them while
// they are in registers and L1, and multiplies them into V straight away. Nothing the size of
// the score matrix is ever written.
//
// scale None is 1/sqrt(depth), as for torch's scaled_dot_product_attention.
// Numerics: fp32 throughout (operands, dot products, exponentials, sums), so the result is the
// fp32 reference's to within rounding order. q·scale is formed first, as ATen's math path does.
// A row whose every position is masked is all zeros, as torch's scaled_dot_product_attention
// gives. With is_causal, row i keeps the positions j <= i (the top-left alignment torch uses).
// Grouped-query heads: query head h reads key/value head h / (heads / kv_heads).
//
// Operands may be any strided fp32 or bf16 tensors whose last dimension is dense (the
// transposed views a projection's output arrives as are read in place). The output is laid out
// [batch, length, heads, depth] and returned as the [batch, heads, length, depth] view, so the
// usual transpose(1, 2).reshape(batch, length, heads * depth) after attention is free.
//
// Two code paths, chosen at run time by CPU features: AVX-512 (16 floats per register, the score
// and output loops blocked four query rows at a time) and portable C++.

#include "attention.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "isa.h"
#include "simd.h"

namespace qcompile {
namespace {

constexpr int64_t kColumns = 32;  // scores and outputs are computed 32 columns (two registers) at a time
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One (batch, head) pair: row pointers and row strides, in elements; each row is dense.
struct Head {
  const float* q; int64_t q_row;
  const float* k; int64_t k_row;
  const float* v; int64_t v_row;
  const float* mask; int64_t mask_row;  // nullptr without a mask; mask_row is 0 when rows share one
  void* out; int64_t out_row;  // fp32, or the Quantized output's integers
  const float* multiplier;     // the head's channels of the Quantized output's multiplier, or nullptr
};

// The output quantized per tensor, for attention_quantize: q = clamp(round(y · m / S) + Z), m the
// per-channel multiplier (outlier smoothing's) over the [heads · v_depth] channels, or 1.
struct Quantized {
  float scale, zero_point, qmin, qmax;
  bool is_signed;  // int8 storage, else uint8
};

struct Sizes {
  int64_t lq, lk, depth, v_depth;  // lk: the key positions computed (see kept_columns)
  int64_t lk_pad, v_pad;  // all key positions and v_depth, rounded up to kColumns: buffer strides
  float scale;
  bool causal;
  const Quantized* quantized;  // nullptr: fp32 output
};

// Thread-local work space for one head: Kᵀ [depth][lk_pad], V [lk][v_pad], the scaled query rows of
// a block [4][depth], their scores / probabilities [4][lk_pad] and outputs [4][v_pad] (a row read
// unpacked uses q and p only).
struct Workspace {
  std::vector<float> kt, v, q, p, o;
  explicit Workspace(const Sizes& s)
      : kt(s.depth * s.lk_pad, 0.f), v(s.lk * s.v_pad, 0.f), q(4 * s.depth), p(4 * s.lk_pad), o(4 * s.v_pad) {}
};

// Kᵀ and V packed densely for the positions computed. Columns of Kᵀ past them (zeros, or an earlier
// head's) give scores the softmax never reads; padding columns of V (zeros) give outputs never stored.
void pack(const Head& h, const Sizes& s, Workspace& w) {
  for (int64_t j = 0; j < s.lk; ++j) {
    const float* k = h.k + j * h.k_row;
    for (int64_t d = 0; d < s.depth; ++d) w.kt[d * s.lk_pad + j] = k[d];
    std::copy(h.v + j * h.v_row, h.v + j * h.v_row + s.v_depth, w.v.data() + j * s.v_pad);
  }
}

// Mask values at or below kDropped remove a position, and a row with some value at or above
// kAnchor keeps one: with scores far below 1e19, such a removed position's exponential underflows
// to exactly 0 in the reference too, so it need not be computed.
constexpr float kDropped = -1e30f;
constexpr float kAnchor = -1e20f;

// The key positions one head computes: up to the last one any row of its mask keeps, when every
// row keeps one (padding at the end of a sequence is never read); else all of them.
int64_t kept_columns(const float* mask, int64_t mask_row, int64_t rows, int64_t lk) {
  if (mask == nullptr) return lk;
  int64_t last = -1;
  for (int64_t i = 0; i < (mask_row == 0 ? 1 : rows); ++i) {
    const float* m = mask + i * mask_row;
    bool anchored = false;
    for (int64_t j = 0; j < lk; ++j) {
      if (m[j] > kDropped) last = std::max(last, j);
      anchored = anchored || m[j] >= kAnchor;
    }
    if (!anchored) return lk;
  }
  return last + 1;
}

// The number of positions row i may attend to before the mask: all, or j <= i when causal.
int64_t visible(const Sizes& s, int64_t i) { return s.causal ? std::min(s.lk, i + 1) : s.lk; }

// ---------------------------------------------------------------------------------------------
// Portable path.

// Output row i = o · inv, stored as fp32 or quantized (times the multiplier first).
void store_row_portable(const Head& h, const Sizes& s, int64_t i, const float* o, float inv) {
  if (s.quantized == nullptr) {
    float* out = static_cast<float*>(h.out) + i * h.out_row;
    for (int64_t e = 0; e < s.v_depth; ++e) out[e] = o[e] * inv;
    return;
  }
  const Quantized& z = *s.quantized;
  for (int64_t e = 0; e < s.v_depth; ++e) {
    float v = o[e] * inv;
    if (h.multiplier) v *= h.multiplier[e];
    const float k = quantize_value(v, z.scale, z.zero_point, z.qmin, z.qmax);
    if (z.is_signed) static_cast<int8_t*>(h.out)[i * h.out_row + e] = static_cast<int8_t>(k);
    else static_cast<uint8_t*>(h.out)[i * h.out_row + e] = static_cast<uint8_t>(k);
  }
}

void head_portable(const Head& h, const Sizes& s, Workspace& w) {
  pack(h, s, w);
  float* p = w.p.data();
  float* o = w.o.data();
  for (int64_t i = 0; i < s.lq; ++i) {
    const float* q = h.q + i * h.q_row;
    std::fill(p, p + s.lk_pad, 0.f);
    for (int64_t d = 0; d < s.depth; ++d) {
      const float qd = q[d] * s.scale;
      const float* kt = w.kt.data() + d * s.lk_pad;
      for (int64_t j = 0; j < s.lk; ++j) p[j] += qd * kt[j];
    }
    const int64_t n = visible(s, i);
    const float* mask = h.mask ? h.mask + i * h.mask_row : nullptr;
    float top = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      if (mask) p[j] += mask[j];
      top = std::max(top, p[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < s.lk; ++j) {
      p[j] = (j < n && top != kNegInf) ? std::exp(p[j] - top) : 0.f;
      sum += p[j];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    std::fill(o, o + s.v_depth, 0.f);
    for (int64_t j = 0; j < s.lk; ++j) {
      const float* v = w.v.data() + j * s.v_pad;
      for (int64_t e = 0; e < s.v_depth; ++e) o[e] += p[j] * v[e];
    }
    store_row_portable(h, s, i, o, inv);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 path.

// store_row_portable, 16 channels at a time.
QC_AVX512 void store_row_avx512(const Head& h, const Sizes& s, int64_t i, const float* o, float inv) {
  const __m512 factor = _mm512_set1_ps(inv);
  if (s.quantized == nullptr) {
    float* out = static_cast<float*>(h.out) + i * h.out_row;
    for (int64_t e = 0; e < s.v_depth; e += 16) {
      const __mmask16 m = tail_mask(s.v_depth - e);
      _mm512_mask_storeu_ps(out + e, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + e), factor));
    }
    return;
  }
  const Quantized& z = *s.quantized;
  const __m512 scale = _mm512_set1_ps(z.scale), zero_point = _mm512_set1_ps(z.zero_point);
  const __m512 qmin = _mm512_set1_ps(z.qmin), qmax = _mm512_set1_ps(z.qmax);
  for (int64_t e = 0; e < s.v_depth; e += 16) {
    const __mmask16 m = tail_mask(s.v_depth - e);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + e), factor);
    if (h.multiplier) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, h.multiplier + e));
    if (z.is_signed) {
      store_quantized(static_cast<int8_t*>(h.out) + i * h.out_row + e, m, v, scale, zero_point, qmin, qmax);
    } else {
      store_quantized(static_cast<uint8_t*>(h.out) + i * h.out_row + e, m, v, scale, zero_point, qmin, qmax);
    }
  }
}

// c[r][0 .. columns) = Σ_i a[r][i]·b[i][0 .. columns) for R rows, 32 columns per step (2·R
// accumulators), columns rounded up to 32 inside b's and c's rows: a block of rows' scores (a the
// scaled queries, b Kᵀ) and their outputs (a the probabilities, b V).
template <int R>
QC_AVX512 void rows_times_matrix(const float* a, int64_t a_row, const float* b, int64_t b_row, int64_t inner,
                                 int64_t columns, float* c, int64_t c_row) {
  for (int64_t j = 0; j < columns; j += kColumns) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < inner; ++i) {
      const __m512 b0 = _mm512_loadu_ps(b + i * b_row + j);
      const __m512 b1 = _mm512_loadu_ps(b + i * b_row + j + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 ai = _mm512_set1_ps(a[r * a_row + i]);
        acc[r][0] = _mm512_fmadd_ps(ai, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(ai, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(c + r * c_row + j, acc[r][0]);
      _mm512_storeu_ps(c + r * c_row + j + 16, acc[r][1]);
    }
  }
}

// The lanes of a 16-float step `remaining` elements before a row's end (none past it).
QC_AVX512 inline __mmask16 row_lanes(int64_t remaining) {
  return remaining <= 0 ? static_cast<__mmask16>(0) : tail_mask(remaining);
}

// R rows' scores (+ mask) turned into unnormalized probabilities in place, row r at p + r·p_row
// with n[r] positions visible (the rest, up to lk, get 0); inv[r] is 1 / their sum (0 for a row
// with nothing visible, whose probabilities are all 0). The rows go through each step together:
// a row alone is a chain of dependent reductions and exponentials (its maximum, then its sum),
// and interleaving R independent chains keeps the vector units busy (four rows of all-MiniLM's
// attention: 2.1x faster than one after another).
template <int R>
QC_AVX512 void softmax_rows_avx512(float* p, int64_t p_row, const float* mask, int64_t mask_row,
                                   const int64_t* n, int64_t lk, float* inv) {
  const int64_t widest = *std::max_element(n, n + R);
  __m512 top[R];
  for (int r = 0; r < R; ++r) top[r] = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < widest; j += 16) {
    for (int r = 0; r < R; ++r) {
      const __mmask16 m = row_lanes(n[r] - j);
      __m512 x = _mm512_maskz_loadu_ps(m, p + r * p_row + j);
      if (mask) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, mask + r * mask_row + j));
      _mm512_mask_storeu_ps(p + r * p_row + j, m, x);
      top[r] = _mm512_mask_max_ps(top[r], m, top[r], x);
    }
  }
  __m512 shift[R], sum[R];
  for (int r = 0; r < R; ++r) {
    const float peak = _mm512_reduce_max_ps(top[r]);
    // A row with nothing visible keeps no position: its shift of +inf sends every score to 0.
    shift[r] = _mm512_set1_ps(peak == kNegInf ? std::numeric_limits<float>::infinity() : peak);
    sum[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < widest; j += 16) {
    for (int r = 0; r < R; ++r) {
      const __mmask16 m = row_lanes(n[r] - j);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + r * p_row + j), shift[r]));
      _mm512_mask_storeu_ps(p + r * p_row + j, m, e);
      sum[r] = _mm512_mask_add_ps(sum[r], m, sum[r], e);
    }
  }
  for (int r = 0; r < R; ++r) {
    std::fill(p + r * p_row + n[r], p + r * p_row + lk, 0.f);
    const float total = _mm512_reduce_add_ps(sum[r]);
    inv[r] = total > 0.f ? 1.f / total : 0.f;
  }
}

// Query rows i0 .. i0 + R - 1 of one head.
template <int R>
QC_AVX512 void rows_avx512(const Head& h, const Sizes& s, Workspace& w, int64_t i0) {
  for (int r = 0; r < R; ++r) {
    const float* q = h.q + (i0 + r) * h.q_row;
    for (int64_t d = 0; d < s.depth; ++d) w.q[r * s.depth + d] = q[d] * s.scale;
  }
  rows_times_matrix<R>(w.q.data(), s.depth, w.kt.data(), s.lk_pad, s.depth, s.lk, w.p.data(), s.lk_pad);
  int64_t n[R];
  for (int r = 0; r < R; ++r) n[r] = visible(s, i0 + r);
  float inv[R];
  softmax_rows_avx512<R>(w.p.data(), s.lk_pad, h.mask ? h.mask + i0 * h.mask_row : nullptr, h.mask_row, n, s.lk, inv);
  rows_times_matrix<R>(w.p.data(), s.lk_pad, w.v.data(), s.v_pad, s.lk, s.v_pad, w.o.data(), s.v_pad);
  for (int r = 0; r < R; ++r) {
    const float* o = w.o.data() + r * s.v_pad;
    store_row_avx512(h, s, i0 + r, o, inv[r]);
  }
}

// One query row read straight from K's and V's rows, without packing them: a decode step's
// (one new token against the whole cache), where packing the cache would cost more than the
// products. Scores are dot products over depth; the output accumulates p[j]·V[j] row by row.
QC_AVX512 void row_unpacked_avx512(const Head& h, const Sizes& s, Workspace& w, int64_t i) {
  float* q = w.q.data();
  for (int64_t d = 0; d < s.depth; ++d) q[d] = h.q[i * h.q_row + d] * s.scale;
  float* p = w.p.data();
  for (int64_t j = 0; j < s.lk; ++j) {
    const float* k = h.k + j * h.k_row;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < s.depth; d += 16) {
      const __mmask16 m = tail_mask(s.depth - d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, k + d), acc);
    }
    p[j] = _mm512_reduce_add_ps(acc);
  }
  const int64_t n = visible(s, i);
  float inv;
  softmax_rows_avx512<1>(p, s.lk_pad, h.mask ? h.mask + i * h.mask_row : nullptr, h.mask_row, &n, s.lk, &inv);
  float* o = w.o.data();
  for (int64_t e = 0; e < s.v_depth; e += 16) {
    const __mmask16 m = tail_mask(s.v_depth - e);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.lk; ++j) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, h.v + j * h.v_row + e), acc);
    }
    _mm512_mask_storeu_ps(o + e, m, acc);
  }
  store_row_avx512(h, s, i, o, inv);
}

QC_AVX512 void head_avx512(const Head& h, const Sizes& s, Workspace& w) {
  if (s.lq < 4) {  // no block of four rows to share a packed K and V
    for (int64_t i = 0; i < s.lq; ++i) row_unpacked_avx512(h, s, w, i);
    return;
  }
  pack(h, s, w);
  int64_t i = 0;
  for (; i + 4 <= s.lq; i += 4) rows_avx512<4>(h, s, w, i);
  for (; i < s.lq; ++i) rows_avx512<1>(h, s, w, i);
}

// ---------------------------------------------------------------------------------------------

// A [batch, heads, rows, depth] operand as fp32 with a dense last dimension (copied only if not).
at::Tensor operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "qc::attention: ", name, " must be [batch, heads, length, depth], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "qc::attention: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  at::Tensor f = t.to(at::kFloat);
  return f.stride(3) == 1 ? f : f.contiguous();
}

// The attention of both operators: fp32 output when quantized is nullptr, else its integers, with
// multiplier (or none) over the output's [heads · v_depth] channels.
at::Tensor run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
               const Quantized* quantized, const float* multiplier) {
  const at::Tensor q = operand(query, "query"), k = operand(key, "key"), v = operand(value, "value");
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, "qc::attention: batch sizes differ: query ", q.sizes(),
              ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(v.size(1) == kv_heads && kv_heads > 0 && heads % kv_heads == 0,
              "qc::attention: query heads (", heads, ") must be a multiple of key/value heads (", k.size(1), ", ",
              v.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(2) == k.size(2), "qc::attention: query ", q.sizes(), ", key ",
              k.sizes(), " and value ", v.sizes(), " do not fit together");
  const double factor = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  Sizes s{q.size(2), k.size(2), q.size(3), v.size(3), 0, 0, static_cast<float>(factor), is_causal, quantized};
  s.lk_pad = round_up(std::max<int64_t>(s.lk, 1), kColumns);
  s.v_pad = round_up(std::max<int64_t>(s.v_depth, 1), kColumns);

  at::Tensor m;
  TORCH_CHECK(!(is_causal && mask.has_value() && mask->defined()),
              "qc::attention: give a mask or is_causal, not both (as for scaled_dot_product_attention)");
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    if (m.scalar_type() == at::kBool) {
      m = at::where(m, at::zeros({}, at::kFloat), at::full({}, kNegInf, at::kFloat));
    }
    TORCH_CHECK(m.is_floating_point(), "qc::attention: mask must be bool or float, got ", m.scalar_type());
    m = m.to(at::kFloat).expand({batch, heads, s.lq, s.lk});
    if (m.stride(3) != 1) m = m.contiguous();
  }
  const at::ScalarType storage = quantized == nullptr ? at::kFloat : quantized->is_signed ? at::kChar : at::kByte;
  at::Tensor out = at::empty({batch, s.lq, heads, s.v_depth}, q.options().dtype(storage)).permute({0, 2, 1, 3});
  if (batch * heads * s.lq == 0) return out;

  // The key positions each mask plane keeps, scanned once per plane: heads usually share one
  // (a [batch, 1, rows, keys] mask expanded over them), and scanning it again for every head
  // cost as much as the attention itself (all-MiniLM at 32 x 128: 2.5 of 6 ms per layer).
  const int64_t planes_per_batch = m.defined() && m.stride(1) != 0 ? heads : 1;
  std::vector<int64_t> kept(m.defined() ? batch * planes_per_batch : 0);
  if (m.defined()) {
    at::parallel_for(0, static_cast<int64_t>(kept.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* plane = m.data_ptr<float>() + (t / planes_per_batch) * m.stride(0) +
                             (t % planes_per_batch) * m.stride(1);
        kept[t] = kept_columns(plane, m.stride(2), s.lq, s.lk);
      }
    });
  }

  const Isa isa = active_isa();
  const int64_t group = heads / kv_heads;
  char* const out_bytes = static_cast<char*>(out.data_ptr());
  const int64_t element = out.element_size();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Workspace w(s);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / heads, hq = t % heads, hk = hq / group;
      Head h{q.data_ptr<float>() + b * q.stride(0) + hq * q.stride(1), q.stride(2),
             k.data_ptr<float>() + b * k.stride(0) + hk * k.stride(1), k.stride(2),
             v.data_ptr<float>() + b * v.stride(0) + hk * v.stride(1), v.stride(2),
             nullptr, 0,
             out_bytes + (b * out.stride(0) + hq * out.stride(1)) * element, out.stride(2),
             multiplier ? multiplier + hq * s.v_depth : nullptr};
      Sizes head = s;
      if (m.defined()) {
        h.mask = m.data_ptr<float>() + b * m.stride(0) + hq * m.stride(1);
        h.mask_row = m.stride(2);
        head.lk = kept[b * planes_per_batch + (planes_per_batch == 1 ? 0 : hq)];
      }
      switch (isa) {
        case Isa::Avx512: head_avx512(h, head, w); break;
        case Isa::Avx2:
        case Isa::Portable: head_portable(h, head, w); break;
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
                     at::ScalarType out_dtype) {
  const at::Tensor out = run(query, key, value, mask, scale, is_causal, nullptr, nullptr);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

at::Tensor attention_quantize(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& mask, std::optional<double> scale, bool is_causal,
                              const std::optional<at::Tensor>& multiplier, double out_scale, int64_t zero_point,
                              int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, "qc::attention_quantize: dtype must be uint8 or int8, got ",
              dtype);
  const int64_t channels = query.size(1) * value.size(3);
  at::Tensor factors;
  if (multiplier.has_value() && multiplier->defined()) {
    factors = multiplier->to(at::kFloat).contiguous();
    TORCH_CHECK(factors.dim() == 1 && factors.numel() == channels, "qc::attention_quantize: multiplier must be [",
                channels, "] (heads x value depth), got ", multiplier->sizes());
  }
  const Quantized quantized{static_cast<float>(out_scale), static_cast<float>(zero_point), static_cast<float>(qmin),
                            static_cast<float>(qmax), dtype == at::kChar};
  return run(query, key, value, mask, scale, is_causal, &quantized,
             factors.defined() ? factors.data_ptr<float>() : nullptr);
}

}  // namespace qcompile
