// qc::gru_recurrence and qc::lstm_recurrence: the recurrent half of a GRU / LSTM layer as one
// kernel over all its steps.
//
// A recurrent layer is two products: x_t·W_ihᵀ, which reads only the input and so runs for every
// step at once as one GEMM (the int8 linear in front of this kernel), and h_{t-1}·W_hhᵀ, which
// must wait for the previous step. ATen runs each step as a small GEMM call plus half a dozen
// element-wise ops (about 20 µs a step for a 64-wide GRU at batch 6, nearly all of it per-call
// cost); here a step is one pass: the product accumulated into registers-sized column blocks of
// W_hh (packed once per weight into panels, accumulators held in registers), then the gates of
// those columns, written straight into the next state.
//
//   GRU (PyTorch's gate order r, z, n):  Gh = h·W_hhᵀ + b_hh
//     r = σ(Gx_r + Gh_r)   z = σ(Gx_z + Gh_z)   n = tanh(Gx_n + r ⊙ Gh_n)   h' = n + z ⊙ (h − n)
//   LSTM (order i, f, g, o):             G = Gx + h·W_hhᵀ + b_hh
//     c' = σ(G_f) ⊙ c + σ(G_i) ⊙ tanh(G_g)   h' = σ(G_o) ⊙ tanh(c')
//
// Column blocks are independent within a step, so a layer wide enough to pay for it splits them
// across torch's threads (one parallel region per step); a narrow one runs on the calling thread.
// Numerics: fp32 throughout; σ and tanh from one e^{-|x|} each, to a few ulps (AVX-512), or
// std::exp (portable). Gx is [steps, batch, G·H] (or [batch, steps, G·H] with batch_first), any
// strides with a dense last dimension; the outputs are fp32 in the same layout.

#include "recurrence.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "isa.h"
#include "names.h"
#include "simd.h"
#include "weight_cache.h"

namespace qcompile {
namespace {

enum class Cell { Gru, Lstm };

constexpr int64_t kBlock = 32;            // columns of each gate computed together (two registers)
constexpr int64_t kParallelMacs = 1 << 20;  // a step smaller than this stays on one thread (a fork costs µs)

// σ(x) and tanh(x) from e = e^{-|x|} (never overflows): σ(x) = 1/(1+e) for x >= 0, e/(1+e) below;
// tanh(|x|) = (1 − e²)/(1 + e²).
inline float sigmoid(float x) {
  const float e = std::exp(-std::fabs(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

inline float tanh_of(float x) {
  const float e = std::exp(-2.f * std::fabs(x));
  return std::copysign((1.f - e) / (1.f + e), x);
}

QC_AVX512 inline __m512 sigmoid16(__m512 x) {
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(inv, negative, inv, e);
}

QC_AVX512 inline __m512 tanh16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 e = exp_nonpositive(_mm512_mul_ps(a, _mm512_set1_ps(-2.f)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

struct Shapes {
  int64_t steps, batch, hidden, gates;  // gates: 3 (GRU) or 4 (LSTM)
  int64_t gx_step, gx_row;              // strides of Gx between steps and between batch rows
  int64_t out_step, out_row;
};

// W_hh packed for the steps: for each block of kBlock columns, for each k, the block's columns of
// every gate side by side, so a block's product reads one contiguous panel from first k to last:
// panel[block][k][g][j] = W_hh[g·H + block·kBlock + j][k] (zero past H), bias likewise [block][g][j].
// Made once per weight (and bias), kept in a weight cache while the weight lives.
Packed pack(const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, int64_t gates, int64_t hidden) {
  const int64_t blocks = (hidden + kBlock - 1) / kBlock;
  at::Tensor panel = at::zeros({blocks, hidden, gates, kBlock}, at::kFloat);
  at::Tensor bias = at::zeros({blocks, gates, kBlock}, at::kFloat);
  const at::Tensor w = w_hh.to(at::kFloat).contiguous();
  const float* wd = w.data_ptr<float>();
  float* pd = panel.data_ptr<float>();
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t width = std::min(kBlock, hidden - block * kBlock);
    for (int64_t g = 0; g < gates; ++g) {
      for (int64_t j = 0; j < width; ++j) {
        const float* row = wd + (g * hidden + block * kBlock + j) * hidden;
        float* dst = pd + (block * hidden * gates + g) * kBlock + j;
        for (int64_t k = 0; k < hidden; ++k) dst[k * gates * kBlock] = row[k];
      }
    }
  }
  if (b_hh) {
    const at::Tensor b = b_hh->to(at::kFloat).contiguous();
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t width = std::min(kBlock, hidden - block * kBlock);
      for (int64_t g = 0; g < gates; ++g) {
        std::copy_n(b.data_ptr<float>() + g * hidden + block * kBlock, width,
                    bias.data_ptr<float>() + (block * gates + g) * kBlock);
      }
    }
  }
  return {panel, bias};
}

// acc[b][g][j] = bias[g][j] + Σ_k h[b][k]·panel[k][g][j] for one block, every row b: plain loops.
inline void product_portable(int64_t batch, int64_t hidden, int64_t gates, const float* h, const float* panel,
                             const float* bias, float* acc) {
  const int64_t row = gates * kBlock;
  for (int64_t b = 0; b < batch; ++b) {
    float* a = acc + b * row;
    std::copy_n(bias, row, a);
    for (int64_t k = 0; k < hidden; ++k) {
      const float hk = h[b * hidden + k];
      const float* w = panel + k * row;
      for (int64_t j = 0; j < row; ++j) a[j] += hk * w[j];
    }
  }
}

// The same with the accumulators in registers: R rows × G gates × kBlock columns (two registers),
// each panel row loaded once for the R rows, the k loop with no memory traffic besides the panel.
template <int R, int G>
QC_AVX512 inline void product_tile(int64_t hidden, const float* h, const float* panel, const float* bias, float* acc) {
  __m512 a[R][G][2];
  for (int g = 0; g < G; ++g) {
    const __m512 b0 = _mm512_loadu_ps(bias + g * kBlock), b1 = _mm512_loadu_ps(bias + g * kBlock + 16);
    for (int r = 0; r < R; ++r) a[r][g][0] = b0, a[r][g][1] = b1;
  }
  for (int64_t k = 0; k < hidden; ++k) {
    const float* w = panel + k * G * kBlock;
    __m512 hk[R];
    for (int r = 0; r < R; ++r) hk[r] = _mm512_set1_ps(h[r * hidden + k]);
    for (int g = 0; g < G; ++g) {
      const __m512 w0 = _mm512_loadu_ps(w + g * kBlock), w1 = _mm512_loadu_ps(w + g * kBlock + 16);
      for (int r = 0; r < R; ++r) {
        a[r][g][0] = _mm512_fmadd_ps(hk[r], w0, a[r][g][0]);
        a[r][g][1] = _mm512_fmadd_ps(hk[r], w1, a[r][g][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(acc + (r * G + g) * kBlock, a[r][g][0]);
      _mm512_storeu_ps(acc + (r * G + g) * kBlock + 16, a[r][g][1]);
    }
  }
}

template <int G>
QC_AVX512 inline void product_avx512(int64_t batch, int64_t hidden, const float* h, const float* panel,
                                     const float* bias, float* acc) {
  int64_t b = 0;
  for (; b + 2 <= batch; b += 2) product_tile<2, G>(hidden, h + b * hidden, panel, bias, acc + b * G * kBlock);
  if (b < batch) product_tile<1, G>(hidden, h + b * hidden, panel, bias, acc + b * G * kBlock);
}

// The gates of one row's block of columns: h (and c) of the next step from gx, the accumulated
// recurrent product and the previous state.
template <Cell C>
__attribute__((always_inline)) inline void gates_portable(const float* gx, const float* acc, int64_t hidden, int64_t j0, int64_t width, const float* h,
                    const float* c, float* h_next, float* c_next) {
  for (int64_t j = 0; j < width; ++j) {
    const int64_t col = j0 + j;
    if constexpr (C == Cell::Gru) {
      const float r = sigmoid(gx[col] + acc[j]);
      const float z = sigmoid(gx[hidden + col] + acc[kBlock + j]);
      const float n = tanh_of(gx[2 * hidden + col] + r * acc[2 * kBlock + j]);
      h_next[col] = n + z * (h[col] - n);
    } else {
      const float i = sigmoid(gx[col] + acc[j]);
      const float f = sigmoid(gx[hidden + col] + acc[kBlock + j]);
      const float g = tanh_of(gx[2 * hidden + col] + acc[2 * kBlock + j]);
      const float o = sigmoid(gx[3 * hidden + col] + acc[3 * kBlock + j]);
      c_next[col] = f * c[col] + i * g;
      h_next[col] = o * tanh_of(c_next[col]);
    }
  }
}

// Gx + the recurrent product for one gate's 16 columns.
QC_AVX512 inline __m512 gate_input(__mmask16 m, const float* gx, const float* acc) {
  return _mm512_add_ps(_mm512_maskz_loadu_ps(m, gx), _mm512_maskz_loadu_ps(m, acc));
}

template <Cell C>
QC_AVX512 __attribute__((always_inline)) inline void gates_avx512(const float* gx, const float* acc, int64_t hidden, int64_t j0, int64_t width,
                            const float* h, const float* c, float* h_next, float* c_next) {
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    const int64_t col = j0 + j;
    if constexpr (C == Cell::Gru) {
      const __m512 r = sigmoid16(gate_input(m, gx + 0 * hidden + col, acc + 0 * kBlock + j));
      const __m512 z = sigmoid16(gate_input(m, gx + 1 * hidden + col, acc + 1 * kBlock + j));
      const __m512 n = tanh16(_mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(m, acc + 2 * kBlock + j),
                                              _mm512_maskz_loadu_ps(m, gx + 2 * hidden + col)));
      const __m512 prev = _mm512_maskz_loadu_ps(m, h + col);
      _mm512_mask_storeu_ps(h_next + col, m, _mm512_fmadd_ps(z, _mm512_sub_ps(prev, n), n));
    } else {
      const __m512 i = sigmoid16(gate_input(m, gx + 0 * hidden + col, acc + 0 * kBlock + j));
      const __m512 f = sigmoid16(gate_input(m, gx + 1 * hidden + col, acc + 1 * kBlock + j));
      const __m512 g = tanh16(gate_input(m, gx + 2 * hidden + col, acc + 2 * kBlock + j));
      const __m512 o = sigmoid16(gate_input(m, gx + 3 * hidden + col, acc + 3 * kBlock + j));
      const __m512 c1 = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c + col), _mm512_mul_ps(i, g));
      _mm512_mask_storeu_ps(c_next + col, m, c1);
      _mm512_mask_storeu_ps(h_next + col, m, _mm512_mul_ps(o, tanh16(c1)));
    }
  }
}

// The operands of a call: Gx, W_hh and b_hh packed, the state h (and c) and the next one, the outputs.
struct Operands {
  const float* gx;
  const float* panel;
  const float* bias;
  float* h;
  float* c;
  float* h_next;
  float* c_next;
  float* out;
};

// One block of columns of step t, on each instruction set: the recurrent product, then the gates.
template <Cell C>
void block_portable(const Shapes& s, const Operands& x, int64_t block, int64_t t, float* acc) {
  const int64_t j0 = block * kBlock, width = std::min(kBlock, s.hidden - j0);
  product_portable(s.batch, s.hidden, s.gates, x.h, x.panel + block * s.hidden * s.gates * kBlock,
                   x.bias + block * s.gates * kBlock, acc);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t r = b * s.hidden;
    gates_portable<C>(x.gx + t * s.gx_step + b * s.gx_row, acc + b * s.gates * kBlock, s.hidden, j0, width, x.h + r,
                      x.c + r, x.h_next + r, x.c_next + r);
  }
}

template <Cell C>
QC_AVX512 void block_avx512(const Shapes& s, const Operands& x, int64_t block, int64_t t, float* acc) {
  const int64_t j0 = block * kBlock, width = std::min(kBlock, s.hidden - j0);
  const float* panel = x.panel + block * s.hidden * s.gates * kBlock;
  const float* bias = x.bias + block * s.gates * kBlock;
  if constexpr (C == Cell::Gru) {
    product_avx512<3>(s.batch, s.hidden, x.h, panel, bias, acc);
  } else {
    product_avx512<4>(s.batch, s.hidden, x.h, panel, bias, acc);
  }
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t r = b * s.hidden;
    gates_avx512<C>(x.gx + t * s.gx_step + b * s.gx_row, acc + b * s.gates * kBlock, s.hidden, j0, width, x.h + r,
                    x.c + r, x.h_next + r, x.c_next + r);
  }
}

template <Cell C>
void run_steps(const Shapes& s, const Operands& x, bool reverse) {
  const int64_t blocks = (s.hidden + kBlock - 1) / kBlock;
  const int64_t macs_per_block = s.batch * s.gates * s.hidden * std::min(kBlock, s.hidden);
  const int64_t grain = std::max<int64_t>(1, kParallelMacs / std::max<int64_t>(1, macs_per_block));
  const bool avx512 = active_isa() == Isa::Avx512;
  const int64_t state = s.batch * s.hidden;
  for (int64_t step = 0; step < s.steps; ++step) {
    const int64_t t = reverse ? s.steps - 1 - step : step;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(s.batch * s.gates * kBlock);
      for (int64_t block = begin; block < end; ++block) {
        (avx512 ? block_avx512<C> : block_portable<C>)(s, x, block, t, acc.data());
      }
    });
    std::copy(x.h_next, x.h_next + state, x.h);
    if constexpr (C == Cell::Lstm) std::copy(x.c_next, x.c_next + state, x.c);
    for (int64_t b = 0; b < s.batch; ++b) {
      std::copy(x.h + b * s.hidden, x.h + (b + 1) * s.hidden, x.out + t * s.out_step + b * s.out_row);
    }
  }
}

// Checks the operands, runs the steps; returns (every h_t, last h, last c or undefined).
template <Cell C>
std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrence(const char* op, const at::Tensor& gates_x,
                                                          const at::Tensor& h0, const at::Tensor* c0,
                                                          const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                                          bool reverse, bool batch_first) {
  const int64_t gates = C == Cell::Gru ? 3 : 4;
  TORCH_CHECK(gates_x.dim() == 3, op, ": gates_x must be 3-D [steps, batch, ", gates, "·hidden], got ", gates_x.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op, ": w_hh must be [", gates,
              "·hidden, hidden], got ", w_hh.sizes());
  const int64_t hidden = w_hh.size(1);
  const int64_t steps = gates_x.size(batch_first ? 1 : 0), batch = gates_x.size(batch_first ? 0 : 1);
  TORCH_CHECK(gates_x.size(2) == gates * hidden, op, ": gates_x's last dimension is ", gates_x.size(2), ", w_hh needs ",
              gates * hidden);
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({batch, hidden}), op, ": h0 must be [", batch, ", ", hidden, "], got ",
              h0.sizes());
  TORCH_CHECK(!c0 || c0->sizes() == h0.sizes(), op, ": c0 must be [", batch, ", ", hidden, "], got ", c0->sizes());
  TORCH_CHECK(!b_hh || (b_hh->dim() == 1 && b_hh->size(0) == gates * hidden), op, ": b_hh must be [", gates * hidden,
              "]");
  for (const at::Tensor* t : {&gates_x, &h0, &w_hh}) {
    TORCH_CHECK(t->is_floating_point(), op, ": operands must be floating point, got ", dtype_name(t->scalar_type()));
  }
  at::Tensor gx = gates_x.to(at::kFloat);
  if (gx.stride(2) != 1) gx = gx.contiguous();
  static WeightCache cache;
  const Packed packed = cache.get(w_hh, b_hh ? *b_hh : at::Tensor(), [&] { return pack(w_hh, b_hh, gates, hidden); });
  at::Tensor h = h0.to(at::kFloat).contiguous().clone();
  at::Tensor c = c0 ? c0->to(at::kFloat).contiguous().clone() : at::Tensor();
  at::Tensor out = batch_first ? at::empty({batch, steps, hidden}, gx.options().dtype(at::kFloat))
                               : at::empty({steps, batch, hidden}, gx.options().dtype(at::kFloat));
  const int64_t step_dim = batch_first ? 1 : 0, row_dim = batch_first ? 0 : 1;
  const Shapes s{steps, batch, hidden, gates, gx.stride(step_dim), gx.stride(row_dim), out.stride(step_dim),
                 out.stride(row_dim)};
  std::vector<float> h_next(batch * hidden), c_next(c.defined() ? batch * hidden : 0);
  const Operands x{gx.data_ptr<float>(), packed[0].data_ptr<float>(), packed[1].data_ptr<float>(),
                   h.data_ptr<float>(), c.defined() ? c.data_ptr<float>() : nullptr, h_next.data(), c_next.data(),
                   out.data_ptr<float>()};
  if (steps > 0 && batch > 0 && hidden > 0) run_steps<C>(s, x, reverse);
  return {out, h, c};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gru_recurrence(const at::Tensor& gates_x, const at::Tensor& h0,
                                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                                  bool reverse, bool batch_first) {
  auto [out, h, c] = recurrence<Cell::Gru>("qc.gru_recurrence", gates_x, h0, nullptr, w_hh, b_hh, reverse, batch_first);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence(const at::Tensor& gates_x, const at::Tensor& h0,
                                                               const at::Tensor& c0, const at::Tensor& w_hh,
                                                               const std::optional<at::Tensor>& b_hh, bool reverse,
                                                               bool batch_first) {
  return recurrence<Cell::Lstm>("qc.lstm_recurrence", gates_x, h0, &c0, w_hh, b_hh, reverse, batch_first);
}

}  // namespace qcompile
