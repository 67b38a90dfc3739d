// qc.linear_w4a8: int4 weights in groups times uint8 activations quantized per row (per token, or
// one scale for all), with the products summed in integers.
//
// Contract (checked in tests and at compile time against reference_linear_w4a8):
//
//   linear_w4a8(x_q, S_x, Z_x, W_q, S, Z, g, b, out) == linear(S_x·(x_q − Z_x), S·(W_q − Z), b)  in `out`
//
// x_q uint8 [..., in] with S_x, Z_x one per row ([..., 1]) or one in all; W_q [out, in/g, g]
// (int8 storage, values in [-8, 7]) with S and optional Z [out, in/g, 1], g a multiple of 32.
//
// Why: with float activations the int4 weights must be widened to float, one multiply-add per
// weight, and on a CPU without AVX-512 that is compute-bound near one weight per cycle (ATen's
// _weight_int4pack_mm_for_cpu and an FMA kernel of our own alike; weight_only.cpp). The plan's
// W4A8 format has quantized the activations already, so the dot products can run on bytes:
// vpmaddubsw multiplies 32 unsigned activations by 32 signed bytes and adds adjacent products in
// pairs into 16 lanes of 16 bits, 32 weights per instruction.
//
// The algebra, per row (a = x_q, z = Z_x) and output, with u = q + 8 in [0, 16) the nibbles of
// int4_nibbles and, per group, P = Σ a·u, A = Σ a (the row's, once per call), Q = Σ q:
//
//   Σ_k (a − z)(q − Z) = P − (8 + Z)·A − z·(Q − Z·g)
//   y = S_x·( Σ_groups S·P − Σ_groups S·(8 + Z)·A − z·C ) + b,   C = Σ_groups S·(Q − Z·g)
//
// C is the row sum of the dequantized weight, packed once with the nibbles, S and S·(8 + Z).
// Every P is exact: a lane's pair of products is at most 2·255·15 = 7650, and four such pairs
// (four instructions, 128 weights) sum to 30600, under the 16-bit lanes' 32767, so the lanes are
// folded into fp32 as S·P (vpmaddwd, convert, FMA) every 128 weights or at a group's end. The rest is fp32 sums of
// exact integers times scales: about 2^-24 of each term, the terms as large as S_x·S·8·Σa.
//
// Which code runs: AVX2 (on the avx2 and avx512 instruction sets) the kernel below; with
// AVX512-BF16 and the avx512 instruction set, or on the portable one, x_q dequantized to fp32
// and qc.linear_weight_only's int4pack. Measured on an AMD Zen 4 (AVX512-BF16 and VNNI, 2 threads,
// int4 g128, weights rotated out of cache, ms; this kernel against the bf16 one): at one row both
// are bound by reading the nibbles (4096 x 4096: 0.55 / 0.53; 151936 x 896: 4.7 / 4.5), and from
// 4 rows on the bf16 one is faster (4096 x 4096 at 16 rows: 4.26 / 2.49; 151936 x 896 at 4: 8.3 /
// 5.1), with one exception (896 x 4864 at 64 rows: 2.6 / 4.4), so AVX512-BF16 keeps it. Measured on an AVX2 CPU without VNNI or bf16 (AMD Zen 1, 2 threads, ms; int4 g128,
// weights rotated out of cache; benchmarks.native_kernels), the W4A8 column including the
// per-token choose_qparams and quantize in front, against linear_weight_only on float rows
// (ATen's int4pack at one row, the blocked dequantize + fp32 GEMM at 64):
//
//   weight [out x in]   rows   linear_weight_only   W4A8
//   4864 x 896             1         0.56            0.32
//   896 x 4864             1         0.57            0.32
//   4096 x 4096            1         2.09            1.22
//   151936 x 896           1        15.6             7.37     (9.2 GB/s of nibbles)
//   4864 x 896            64        12.6             9.32
//   151936 x 896          64       449             274
//
// Resident in cache, one row of 4864 x 896 takes 0.17 ms (26 G weights/s on the 2 cores), so a
// decode step is bound by this kernel's arithmetic, not by memory (17 GB/s measured there).

#include "linear_w4a8.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "isa.h"
#include "names.h"
#include "qdq.h"
#include "weight_cache.h"
#include "weight_only.h"

namespace qcompile {
namespace {

#define QC_AVX2 __attribute__((target("avx2,fma")))

constexpr int64_t kHalf = 32;          // weights per vpmaddubsw (a chunk's low or high nibbles)
constexpr int64_t kFoldHalves = 4;     // halves whose 16-bit sums fit a lane (128 weights: 30600)
constexpr int kTile = 4;               // outputs a step computes together, sharing each load of x
constexpr int64_t kPrefetch = 1024;    // bytes ahead of each weight row a step asks the cache for, a line per 2 chunks

// The kernel's form of a grouped weight: nibbles [out, in'/2], S [out, groups], S·(8 + Z)
// [out, groups] and C [out] (the module comment), fp32.
Packed pack_w4a8(const at::Tensor& weight_q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point) {
  const int64_t outputs = weight_q.size(0), groups = weight_q.size(1), group_size = weight_q.size(2);
  const at::Tensor nibbles = int4_nibbles(weight_q, "linear_w4a8");
  const at::Tensor scales = scale.reshape({outputs, groups}).to(at::kFloat).contiguous();
  const bool affine = zero_point.has_value() && zero_point->defined();
  const at::Tensor zeros = affine ? zero_point->reshape({outputs, groups}).to(at::kFloat).contiguous()
                                  : at::zeros({outputs, groups}, scales.options());
  at::Tensor row_sums = at::empty({outputs}, scales.options());
  const at::Tensor weight = weight_q.contiguous();
  const int8_t* q = weight.const_data_ptr<int8_t>();
  const float *s = scales.const_data_ptr<float>(), *z = zeros.const_data_ptr<float>();
  float* c = row_sums.data_ptr<float>();
  at::parallel_for(0, outputs, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double sum = 0;  // Σ S·(Q − Z·g): exact integers times scales
      for (int64_t g = 0; g < groups; ++g) {
        int32_t group_sum = 0;
        for (int64_t k = 0; k < group_size; ++k) group_sum += q[(n * groups + g) * group_size + k];
        sum += static_cast<double>(s[n * groups + g]) * (group_sum - z[n * groups + g] * group_size);
      }
      c[n] = static_cast<float>(sum);
    }
  });
  return Packed{nibbles, scales, (scales * (zeros + 8.0)).contiguous(), row_sums};
}

QC_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Where a row's halves stand: the 16-bit sums are folded every per_fold halves (128 weights, or a
// smaller group) into the current group, which moves on every per_group. Counted down: a division
// per half (an idiv, tens of cycles on Zen 1) had cost more than the arithmetic it guarded.
struct Folds {
  int64_t per_fold, per_group, left, in_group, group;
  Folds(int64_t per_fold, int64_t per_group)
      : per_fold(per_fold), per_group(per_group), left(per_fold), in_group(per_group), group(0) {}
};

// After a half: at a fold, the 16-bit sums into fp32, times the group's scale.
template <int T>
QC_AVX2 inline void after_half(Folds& folds, __m256i (&part)[T], __m256 (&total)[T], const float* scales,
                               int64_t groups) {
  if (--folds.left) return;
  folds.left = folds.per_fold;
  for (int t = 0; t < T; ++t) {
    const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(part[t], _mm256_set1_epi16(1)));
    total[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(scales[t * groups + folds.group]), total[t]);
    part[t] = _mm256_setzero_si256();
  }
  if ((folds.in_group -= folds.per_fold) == 0) folds.group += 1, folds.in_group = folds.per_group;
}

// One row's y for T outputs: x the row's bytes, sums its A per group; w [T][in'/2] nibbles,
// scales, offsets (S·(8 + Z)) [T][groups], row_sums C [T]; y[t] = S_x·(... − z·C) + b.
template <int T>
QC_AVX2 void w4a8_tile(const uint8_t* x, const int32_t* sums, float x_scale, int32_t x_zero, const uint8_t* w,
                       int64_t w_stride, const float* scales, const float* offsets, const float* row_sums,
                       const float* bias, int64_t groups, int64_t group_size, int64_t depth, float* y) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 total[T];
  __m256i part[T];
  for (int t = 0; t < T; ++t) total[t] = _mm256_setzero_ps(), part[t] = _mm256_setzero_si256();
  const int64_t halves = depth / kHalf, per_group = group_size / kHalf;
  Folds folds(std::min(per_group, kFoldHalves), per_group);
  for (int64_t h = 0; h < halves; h += 2) {  // a chunk: 32 bytes of each output, its low then its high nibbles
    const uint8_t* chunk = w + (h / 2) * kHalf;
    __m256i bytes[T];
    const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + h * kHalf));
    for (int t = 0; t < T; ++t) {
      if (h % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(chunk + t * w_stride) + kPrefetch, _MM_HINT_T0);
      bytes[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + t * w_stride));
      part[t] = _mm256_add_epi16(part[t], _mm256_maddubs_epi16(x_low, _mm256_and_si256(bytes[t], low)));
    }
    after_half<T>(folds, part, total, scales, groups);
    if (h + 1 == halves) break;  // an odd number of halves: the last chunk's high nibbles are padding
    const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (h + 1) * kHalf));
    for (int t = 0; t < T; ++t) {
      const __m256i u = _mm256_and_si256(_mm256_srli_epi16(bytes[t], 4), low);
      part[t] = _mm256_add_epi16(part[t], _mm256_maddubs_epi16(x_high, u));
    }
    after_half<T>(folds, part, total, scales, groups);
  }
  for (int t = 0; t < T; ++t) {
    float offset = 0;
    for (int64_t g = 0; g < groups; ++g) offset += offsets[t * groups + g] * static_cast<float>(sums[g]);
    y[t] = x_scale * (horizontal_sum(total[t]) - offset - static_cast<float>(x_zero) * row_sums[t]) +
           (bias ? bias[t] : 0.0f);
  }
}

// rows [M, in] uint8 with their S_x, Z_x ([M] or [1]) times the packed weight, plus the bias: [M, out] fp32.
at::Tensor w4a8_linear(const at::Tensor& rows, const at::Tensor& x_scale, const at::Tensor& x_zero,
                       const Packed& packed, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const at::Tensor &nibbles = packed[0], &scales = packed[1], &offsets = packed[2], &row_sums = packed[3];
  const int64_t m = rows.size(0), depth = rows.size(1), outputs = nibbles.size(0), groups = scales.size(1);
  const uint8_t* x = rows.const_data_ptr<uint8_t>();
  std::vector<int32_t> sums(m * groups);  // A per row and group
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += x[r * depth + k];
      sums[r * groups + g] = sum;
    }
  }
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bs = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({m, outputs}, rows.options().dtype(at::kFloat));
  const uint8_t* w = nibbles.const_data_ptr<uint8_t>();
  const float *s = scales.const_data_ptr<float>(), *o = offsets.const_data_ptr<float>();
  const float *c = row_sums.const_data_ptr<float>(), *xs = x_scale.const_data_ptr<float>();
  const int32_t* xz = x_zero.const_data_ptr<int32_t>();
  const int64_t scale_step = x_scale.numel() > 1, zero_step = x_zero.numel() > 1;  // one per row, or one for all
  float* out = y.data_ptr<float>();
  const int64_t tiles = (outputs + kTile - 1) / kTile, w_stride = nibbles.size(1);
  at::parallel_for(0, tiles, std::max<int64_t>(1, (1 << 16) / (2 * w_stride)), [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n = tile * kTile, width = std::min<int64_t>(kTile, outputs - n);
      for (int64_t r = 0; r < m; ++r) {  // the tile's weights stay in L1 across the rows
        for (int64_t t = 0; t < width; t += width == kTile ? kTile : 1) {  // a last partial tile output by output
          const int64_t i = n + t;
          const auto tile_fn = width == kTile ? &w4a8_tile<kTile> : &w4a8_tile<1>;
          tile_fn(x + r * depth, sums.data() + r * groups, xs[r * scale_step], xz[r * zero_step], w + i * w_stride,
                  w_stride, s + i * groups, o + i * groups, c + i, bs ? bs + i : nullptr, groups, group_size, depth,
                  out + r * outputs + i);
        }
      }
    }
  });
  return y;
}

// S_x (fp32) or Z_x (int32) as a flat tensor of one value per row or one for all: a view when it
// is already that (every call of a decode step), a copy otherwise.
at::Tensor per_row(const at::Tensor& param, int64_t rows, at::ScalarType dtype, const char* what) {
  TORCH_CHECK_VALUE(param.numel() == 1 || param.numel() == rows, "linear_w4a8: ", what,
                    " takes one value per row of x (", rows, ") or one for all, got ", param.numel());
  return param.reshape({-1}).to(dtype).contiguous();
}

}  // namespace

bool w4a8_in_integers() {
  const Isa isa = active_isa();
  return isa == Isa::Avx2 || (isa == Isa::Avx512 && !has_avx512_bf16());
}

at::Tensor linear_w4a8(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight_q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                       int64_t group_size, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(x_q.scalar_type() == at::kByte, "linear_w4a8 takes uint8 activations, got ",
                    dtype_name(x_q.scalar_type()));
  TORCH_CHECK_VALUE(weight_q.scalar_type() == at::kChar, "linear_w4a8 weights are int8 storage, got ",
                    dtype_name(weight_q.scalar_type()));
  check_int4pack(weight_q, scale, group_size, "linear_w4a8");
  const int64_t depth = x_q.size(-1), outputs = weight_q.size(0);
  TORCH_CHECK_VALUE(depth == weight_q.size(1) * group_size, "linear_w4a8: x has ", depth, " features, the weight ",
                    weight_q.size(1) * group_size);
  const int64_t rows = depth > 0 ? x_q.numel() / depth : 0;
  const at::Tensor scales = per_row(x_scale, rows, at::kFloat, "x_scale");
  const at::Tensor zeros = per_row(x_zero_point, rows, at::kInt, "x_zero_point");
  if (!w4a8_in_integers()) {
    const at::Tensor x = dequantize(x_q, x_scale, x_zero_point, std::nullopt, at::kFloat);
    return linear_weight_only(x, weight_q, scale, zero_point, group_size, bias, "int4pack").to(out_dtype);
  }
  static WeightCache cache;
  const bool affine = zero_point.has_value() && zero_point->defined();
  const Packed packed = cache.get(weight_q, {scale, affine ? *zero_point : at::Tensor()},
                                  [&] { return pack_w4a8(weight_q, scale, zero_point); });
  std::vector<int64_t> shape(x_q.sizes().begin(), x_q.sizes().end());
  shape.back() = outputs;
  return w4a8_linear(x_q.reshape({rows, depth}).contiguous(), scales, zeros, packed, group_size, bias)
      .to(out_dtype)
      .view(shape);
}

}  // namespace qcompile
