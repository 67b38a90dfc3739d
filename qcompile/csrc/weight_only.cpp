// qc.linear_weight_only as a native operator, and its int4 matrix-vector kernel.
//
// Contract (checked in tests and at compile time against reference_linear_weight_only):
//
//   linear_weight_only(x, W_q, S, Z, group_size, b, kernel) == linear(x, S·(W_q − Z), b)
//
// with x rounded to bf16 and products summed in fp32 (the bound; the fp32 GEMM path below does not
// round x at all). W_q is int8 storage: [out, in] with [out]
// scales (int8pack, symmetric per channel) or [out, in/g, g] with [out, in/g, 1] scales and
// optional zero points (int4pack, values in [-8, 7], groups of g).
//
// Which code runs, by rows (the leading dimensions of x flattened; fewer is under kGemvRows) and CPU:
//
//   int4pack, AVX512-BF16, fewer rows   int4_tile below, on weights packed once per tensor (weight_cache.h)
//   AVX512-BF16, more rows              blocked_gemm: the weight (int4: its packed form) dequantized to
//                                       bf16 a few MB of outputs at a time, each block through oneDNN's
//                                       bf16 GEMM while it is in cache
//   int8pack, fewer rows                aten._weight_int8pack_mm (bf16 activations: fed fp32 it is 20x slower)
//   int4pack, no AVX512-BF16, fewer     aten._weight_int4pack_mm_for_cpu on its own packed form, made once
//     rows                              per tensor: nibbles u = q + 8, per group bf16 S and −S·Z
//   no AVX512-BF16, more rows           blocked_gemm in fp32 (the weight dequantized to fp32 a block at a
//                                       time): bf16 is emulated there, 4-5x slower than fp32 at 64 rows
//
// Measured on an AVX2 CPU without bf16 instructions (AMD Zen 1, 2 threads, ms): ATen's two kernels
// read the weight in its integer form and win for a few rows, fp32 wins from some dozens on.
//
//   rows   shape (out x in)   bf16 GEMM   fp32 GEMM   int8pack   int4pack g128
//     1    4864 x 896            1.24        1.49        0.48        0.51
//     1    151936 x 896         27.3        46.5        24.8        23.3
//     8    4864 x 896           12.8         9.01        4.60        4.52
//    64    4864 x 896           88.4        21.9        28.5        30.4
//
// At 64 rows the fp32 path, whole weight dequantized per call against blocked (int8 per channel):
// 4864 x 896 31.2 -> 21.3 ms; 151936 x 896 (a vocabulary projection) 1448 -> 671 ms, its peak
// memory above the weights 1038 -> 38 MB.
//
// An fp32 int4 kernel of our own for AVX2 (nibbles widened to 32-bit lanes, converted, one FMA per
// 8 weights, 4 outputs sharing each load of x) measured no faster than ATen's int4pack there:
// 1.10 against 0.97 ms at 1 row of 4864 x 896 (weights rotated out of cache), 8.3 against 3.8 at 8
// rows. Both are compute-bound near one weight per cycle on that 2 GHz CPU, so ATen's stays. A W4A8
// plan's linears read uint8 activations as integers instead (qc.linear_w4a8, linear_w4a8.cpp):
// 1.4-2.1x faster there.
//
// The int4 kernel. A byte holds two weights u = q + 8 in [0, 16): byte i of a row's chunk c holds
// k = 64c + i in its low nibble and k = 64c + 32 + i in its high one, so one 32-byte load widened
// to 16-bit lanes gives, after a mask or a shift, the chunk's two halves lane-aligned with x's
// natural order. OR-ing 0x4300 into a lane makes the bf16 number 128 + u (0x4300 is 128; u fills
// the mantissa's low bits, exactly), so one vdpbf16ps per 32 weights sums x·(136 + q) in fp32
// with no conversion instruction. Per group g the exact algebra is
//
//   Σ_k x_k·S·(q_k − Z) = S·Σ_k x_k·(136 + q_k) − S·(136 + Z)·Σ_k x_k
//
// so the kernel keeps 16-lane sums per group, folds them into the output with one FMA by S, and
// subtracts the second term from each group's Σx (computed once per row) and the packed
// S·(136 + Z). The extra 136·Σx is cancelled in fp32; it costs about 2^-24·136 of Σ|x| per
// group, far under the bf16 rounding of x itself (2^-9 of each |x|). Where ATen's
// _weight_int4pack_mm_for_cpu converts each nibble to float before a FMA, this reads 64 weights
// in 6 instructions, so a batch-1 decode step is bound by reading the weight bytes.

#include "weight_only.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <functional>
#include <string>
#include <vector>

#include "isa.h"
#include "names.h"
#include "simd.h"
#include "weight_cache.h"

namespace qcompile {
namespace {

#define QC_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512bf16")))

constexpr int64_t kChunk = 64;  // weights of one row per packed chunk (32 bytes)
constexpr int64_t kHalf = 32;   // weights per vdpbf16ps
constexpr int64_t kPrefetch = 1024;
constexpr int64_t kGemmBlockBytes = 4 << 20;  // bf16 weight rows dequantized per GEMM call
constexpr int64_t kPackRows = 4096;  // rows a packing widens at a time (a multiple of ATen's 64)
constexpr int kTile = 4;        // outputs a step computes together (independent sums for the FMA pipes)

const char* const kKernels[] = {"int8pack", "int4pack"};

void check_int4_range(const at::Tensor& weight_q, std::string_view op) {
  TORCH_CHECK_VALUE(weight_q.min().item<int64_t>() >= -8 && weight_q.max().item<int64_t>() <= 7,
                    op, ": int4pack takes weights in [-8, 7]");
}

// `out` [rows (+ padding), ...] written with pack(r, n), the packed rows [r, r + n) of a weight
// (and after the last, any padding rows), kPackRows at a time. A packing widens the int8 codes to
// int32 first: for a 151936 x 896 vocabulary projection whole that held 1.5 GB more on the first
// call; a block at a time, into an output made once (blocks collected and concatenated left
// freed blocks scattered through the heap), about 140 MB.
at::Tensor in_row_blocks(at::Tensor out, int64_t rows, const std::function<at::Tensor(int64_t, int64_t)>& pack) {
  for (int64_t r = 0; r < rows; r += kPackRows) {
    const at::Tensor block = pack(r, std::min(kPackRows, rows - r));
    out.narrow(0, r, block.size(0)).copy_(block);
  }
  return out;
}

// The int4 kernel's form of a grouped weight [out, groups, g] with scales (and zero points)
// [out, groups, 1]: its nibbles (int4_nibbles; the padding reads x's zeros), S [out, groups] and
// S·(136 + Z) [out, groups], fp32.
Packed pack_int4(const at::Tensor& weight_q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point) {
  const int64_t outputs = weight_q.size(0), groups = weight_q.size(1);
  const at::Tensor nibbles = int4_nibbles(weight_q, "linear_weight_only");
  const at::Tensor scales = scale.reshape({outputs, groups}).to(at::kFloat).contiguous();
  at::Tensor offsets = scales * 136.0;
  if (zero_point.has_value() && zero_point->defined()) {
    offsets = scales * (zero_point->reshape({outputs, groups}).to(at::kFloat) + 136.0);
  }
  return Packed{nibbles, scales, offsets.contiguous()};
}

// ATen's int4 CPU kernel's form of a grouped weight: its packing of u = q + 8 [out', in] and, per
// group, [groups, out', 2] bf16 (S, −S·Z), since it computes S·(u − 8) − S·Z = S·(q − Z). It takes
// outputs in multiples of 16: out' = out rounded up, the extra rows zero (u = 8, S = 0). ATen packs
// rows in blocks of 64, so packing kPackRows at a time gives the same bytes.
Packed pack_int4_aten(const at::Tensor& weight_q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point) {
  const int64_t outputs = weight_q.size(0), groups = weight_q.size(1), padding = round_up(outputs, 16) - outputs;
  const int64_t depth = groups * weight_q.size(2);
  check_int4_range(weight_q, "linear_weight_only");
  const at::Tensor nibbles = in_row_blocks(at::empty({outputs + padding, depth / 2}, weight_q.options().dtype(at::kByte)),
                                           outputs, [&](int64_t r, int64_t n) {
    at::Tensor u = (weight_q.narrow(0, r, n).to(at::kInt) + 8).reshape({n, -1});
    if (r + n == outputs) u = at::constant_pad_nd(u, {0, 0, 0, padding}, 8);
    return at::_convert_weight_to_int4pack_for_cpu(u.contiguous(), 1);
  });
  const at::Tensor scales = at::constant_pad_nd(scale.reshape({outputs, groups}).to(at::kFloat), {0, 0, 0, padding}, 0);
  const at::Tensor offsets = zero_point.has_value() && zero_point->defined()
                                 ? -scales * at::constant_pad_nd(zero_point->reshape({outputs, groups}).to(at::kFloat),
                                                                 {0, 0, 0, padding}, 0)
                                 : at::zeros_like(scales);
  return Packed{nibbles, at::stack({scales.t(), offsets.t()}, -1).to(at::kBFloat16).contiguous()};
}

// Folds each output's and row's group sums into its total: total += S·acc, offset += S·(136 + Z)·Σx.
template <int T, int R>
QC_BF16 inline void fold_group(__m512 (&total)[T][R], __m512 (&acc)[T][R], float (&offset)[T][R], const float* sums,
                               const float* scales, const float* offsets, int64_t groups, int64_t group) {
  for (int t = 0; t < T; ++t) {
    const __m512 s = _mm512_set1_ps(scales[t * groups + group]);
    for (int r = 0; r < R; ++r) {
      total[t][r] = _mm512_fmadd_ps(acc[t][r], s, total[t][r]);
      acc[t][r] = _mm512_setzero_ps();
      offset[t][r] += offsets[t * groups + group] * sums[r * groups + group];
    }
  }
}

// y[r][t] (+ b[t]) for T outputs and R rows: x is [R][in'] bf16 bits, sums [R][groups] each
// group's Σx, w [T][in'/2] nibbles, scales and offsets [T][groups] (the module comment's algebra).
template <int T, int R>
QC_BF16 void int4_tile(const uint16_t* x, int64_t x_stride, const float* sums, const uint8_t* w, int64_t w_stride,
                       const float* scales, const float* offsets, const float* bias, int64_t groups,
                       int64_t group_size, int64_t depth, float* y, int64_t y_stride) {
  const __m512i low = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
  __m512 total[T][R], acc[T][R];
  float offset[T][R] = {};
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) total[t][r] = acc[t][r] = _mm512_setzero_ps();
  const int64_t halves = depth / kHalf, halves_per_group = group_size / kHalf;
  for (int64_t h = 0; h < halves; h += 2) {
    const int64_t c = h / 2;
    __m512i bytes[T];
    for (int t = 0; t < T; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(w + t * w_stride + c * kHalf) + kPrefetch, _MM_HINT_T0);
      bytes[t] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * w_stride + c * kHalf)));
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xs = (__m512bh)_mm512_loadu_si512(x + r * x_stride + c * kChunk);
      for (int t = 0; t < T; ++t) {
        const __m512i lanes = _mm512_ternarylogic_epi32(bytes[t], low, bf16_128, 0xEA);  // (u & 0xF) | 0x4300
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)lanes, xs);
      }
    }
    if ((h + 1) % halves_per_group == 0) {
      fold_group<T, R>(total, acc, offset, sums, scales, offsets, groups, h / halves_per_group);
    }
    if (h + 1 == halves) break;  // an odd number of halves: the last chunk's high nibbles are padding
    for (int r = 0; r < R; ++r) {
      const __m512bh xs = (__m512bh)_mm512_loadu_si512(x + r * x_stride + c * kChunk + kHalf);
      for (int t = 0; t < T; ++t) {
        const __m512i lanes = _mm512_or_si512(_mm512_srli_epi16(bytes[t], 4), bf16_128);  // (u >> 4) | 0x4300
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)lanes, xs);
      }
    }
    if ((h + 2) % halves_per_group == 0) {
      fold_group<T, R>(total, acc, offset, sums, scales, offsets, groups, (h + 1) / halves_per_group);
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      y[r * y_stride + t] = _mm512_reduce_add_ps(total[t][r]) - offset[t][r] + (bias ? bias[t] : 0.0f);
    }
  }
}

// One row of fp32 activations as the kernel reads them: bf16 (rounded to nearest even, as
// Tensor.to(torch.bfloat16) rounds), zero up to in', and each group's sum of those bf16 values.
QC_BF16 void bf16_row(const float* x, int64_t depth, int64_t padded, int64_t group_size, uint16_t* out, float* sums) {
  for (int64_t k = 0; k < padded; k += 16) {
    const __mmask16 m = k < depth ? tail_mask(depth - k) : 0;
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), bits);
  }
  for (int64_t g = 0; g * group_size < depth; ++g) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + k));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
    }
    sums[g] = _mm512_reduce_add_ps(sum);
  }
}

// rows [M, in] fp32 times the packed int4 weight, plus the bias: [M, out] fp32.
at::Tensor int4_linear(const at::Tensor& rows, const Packed& packed, int64_t group_size,
                       const std::optional<at::Tensor>& bias) {
  const at::Tensor &nibbles = packed[0], &scales = packed[1], &offsets = packed[2];
  const int64_t m = rows.size(0), depth = rows.size(1), outputs = nibbles.size(0), groups = scales.size(1);
  const int64_t padded = nibbles.size(1) * 2;
  std::vector<uint16_t> xs(m * padded);
  std::vector<float> sum(m * groups);
  for (int64_t r = 0; r < m; ++r) {
    bf16_row(rows.const_data_ptr<float>() + r * depth, depth, padded, group_size, xs.data() + r * padded,
             sum.data() + r * groups);
  }
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bs = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({m, outputs}, rows.options());
  const uint8_t* w = nibbles.const_data_ptr<uint8_t>();
  const float *s = scales.const_data_ptr<float>(), *o = offsets.const_data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t tiles = (outputs + kTile - 1) / kTile, w_stride = padded / 2;
  at::parallel_for(0, tiles, std::max<int64_t>(1, (1 << 16) / padded), [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n = tile * kTile, width = std::min<int64_t>(kTile, outputs - n);
      for (int64_t r = 0; r < m; r += 2) {
        const uint16_t* xr = xs.data() + r * padded;
        const float* sr = sum.data() + r * groups;
        const bool pair = r + 1 < m;
        for (int64_t t = 0; t < width; t += width == kTile ? kTile : 1) {  // a last partial tile output by output
          const int64_t i = n + t;
          const auto tile_fn = width == kTile ? (pair ? &int4_tile<kTile, 2> : &int4_tile<kTile, 1>)
                                              : (pair ? &int4_tile<1, 2> : &int4_tile<1, 1>);
          tile_fn(xr, padded, sr, w + i * w_stride, w_stride, s + i * groups, o + i * groups, bs ? bs + i : nullptr,
                  groups, group_size, depth, out + r * outputs + i, outputs);
        }
      }
    }
  });
  return y;
}

// Rows [n0, n1) of the packed int4 weight as bf16 [n1 − n0, in]: S·(q − Z), rounded once from
// fp32 as (128 + u)·S − S·(136 + Z) with u = q + 8 (the 128 + u from the same lanes as int4_tile).
QC_BF16 void dequantize_int4_rows(const Packed& packed, int64_t n0, int64_t n1, int64_t depth, int64_t group_size,
                                  at::BFloat16* out) {
  const at::Tensor &nibbles = packed[0], &scales = packed[1], &offsets = packed[2];
  const int64_t groups = scales.size(1), w_stride = nibbles.size(1);
  const __m512i low = _mm512_set1_epi32(0x0F), bf16_128 = _mm512_set1_epi32(0x4300);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = nibbles.const_data_ptr<uint8_t>() + n * w_stride;
    const float *s = scales.const_data_ptr<float>() + n * groups, *o = offsets.const_data_ptr<float>() + n * groups;
    auto* row = reinterpret_cast<uint16_t*>(out + (n - n0) * depth);
    for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
      for (int64_t half = 0; half < 2 && k0 + half * kHalf < depth; ++half) {
        const int64_t g = (k0 + half * kHalf) / group_size;
        const __m512 scale = _mm512_set1_ps(s[g]), offset = _mm512_set1_ps(o[g]);
        for (int64_t j = 0; j < kHalf; j += 16) {
          __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k0 / 2 + j)));
          u = half ? _mm512_srli_epi32(u, 4) : _mm512_and_si512(u, low);
          const __m512 value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_or_si512(u, bf16_128), 16));  // 128 + u
          const __m256bh bits = _mm512_cvtneps_pbh(_mm512_fmsub_ps(value, scale, offset));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0 + half * kHalf + j), (__m256i)bits);
        }
      }
    }
  }
}

// Rows [n0, n1) of an int8 per-channel weight [out, in] as bf16: S·q, rounded once from fp32.
QC_BF16 void dequantize_int8_rows(const int8_t* weight, const float* scale, int64_t n0, int64_t n1, int64_t depth,
                                  at::BFloat16* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const __m512 s = _mm512_set1_ps(scale[n]);
    auto* row = reinterpret_cast<uint16_t*>(out + (n - n0) * depth);
    for (int64_t k = 0; k < depth; k += 16) {
      const __mmask16 m = tail_mask(depth - k);
      const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, weight + n * depth + k));
      const __m256bh bits = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
      _mm256_mask_storeu_epi16(row + k, m, (__m256i)bits);
    }
  }
}

// x [M, in] times a weight of `outputs` rows, for many rows, in x's dtype T (bf16 or fp32): the
// weight is dequantized to T (by `dequantize`, rows [r0, r1) into the buffer it is given) a block of
// outputs at a time, a few MB that stay in cache for the GEMM, instead of all of it through memory
// first (which allocated, and faulted in, a copy of the whole weight per call: 545 MB in fp32 for
// a 151936 x 896 vocabulary projection, twice that on the way). [M, out] in T.
template <typename T>
at::Tensor blocked_gemm(const at::Tensor& x, int64_t outputs, const std::function<void(int64_t, int64_t, T*)>& dequantize) {
  const int64_t m = x.size(0), depth = x.size(1);
  const int64_t per_block = std::max<int64_t>(16, kGemmBlockBytes / (static_cast<int64_t>(sizeof(T)) * depth));
  const int64_t block = std::min(outputs, round_up(per_block, 16));
  at::Tensor y = at::empty({m, outputs}, x.options());
  static thread_local at::Tensor scratch;  // one block buffer per calling thread and dtype, kept between calls
  if (!scratch.defined() || scratch.numel() < block * depth) scratch = at::empty({block * depth}, x.options());
  const at::Tensor weight = scratch.narrow(0, 0, block * depth).view({block, depth});
  T* w = weight.data_ptr<T>();
  for (int64_t n0 = 0; n0 < outputs; n0 += block) {
    const int64_t rows = std::min(block, outputs - n0);
    at::parallel_for(n0, n0 + rows, 16, [&](int64_t r0, int64_t r1) { dequantize(r0, r1, w + (r0 - n0) * depth); });
    y.narrow(1, n0, rows).copy_(at::linear(x, weight.narrow(0, 0, rows)));
  }
  return y;
}

// Rows [n0, n1) of S·(W_q − Z) as fp32 [n1 − n0, in], in `groups` groups per row of `group_size`
// (per channel: one group of in), S and Z [out, groups]. (q − Z) is an exact small integer in
// fp32, so each value is rounded once, as the reference's (W_q − Z)·S is.
QC_PORTABLE void dequantize_fp32_rows(const int8_t* weight, const float* scale, const float* zero_point,
                                      int64_t groups, int64_t group_size, int64_t n0, int64_t n1, float* out) {
  const int64_t depth = groups * group_size;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g], z = zero_point ? zero_point[n * groups + g] : 0.0f;
      const int8_t* q = weight + n * depth + g * group_size;
      float* row = out + (n - n0) * depth + g * group_size;
#pragma omp simd
      for (int64_t k = 0; k < group_size; ++k) row[k] = (static_cast<float>(q[k]) - z) * s;
    }
  }
}

}  // namespace

at::Tensor int4_nibbles(const at::Tensor& weight_q, std::string_view op) {
  const int64_t outputs = weight_q.size(0), depth = weight_q.size(1) * weight_q.size(2);
  check_int4_range(weight_q, op);
  const int64_t padded = round_up(depth, kChunk);
  return in_row_blocks(at::empty({outputs, padded / 2}, weight_q.options().dtype(at::kByte)), outputs,
                       [&](int64_t r, int64_t n) {
    at::Tensor u = at::constant_pad_nd(weight_q.narrow(0, r, n).reshape({n, depth}).to(at::kInt) + 8, {0, padded - depth}, 8);
    u = u.view({n, padded / kChunk, 2, kHalf});
    return at::bitwise_or(u.select(2, 0), u.select(2, 1) * 16).to(at::kByte).reshape({n, -1});
  });
}

void check_int4pack(const at::Tensor& weight_q, const at::Tensor& scale, int64_t group_size, std::string_view op) {
  const int64_t outputs = weight_q.size(0);
  TORCH_CHECK_VALUE(weight_q.dim() == 3 && weight_q.size(2) == group_size && group_size % kHalf == 0 &&
                        scale.numel() == outputs * weight_q.size(1),
                    op, ": int4pack takes weights [out, in / ", group_size, ", ", group_size,
                    "] (groups a multiple of 32) with one scale per group, got ", weight_q.sizes(), " and ",
                    scale.numel(), " scales");
}

bool has_avx512_bf16() {
  static const bool found = [] {  // a CPU flag: read once, not on every call
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return found;
}

at::Tensor linear_weight_only(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& scale,
                              const std::optional<at::Tensor>& zero_point, int64_t group_size,
                              const std::optional<at::Tensor>& bias, std::string_view kernel) {
  std::string kernels;
  bool known = false;
  for (const char* name : kKernels) known |= kernel == name, kernels += (kernels.empty() ? "" : ", ") + std::string(name);
  TORCH_CHECK_VALUE(known, "linear_weight_only kernel '", kernel, "' is not one of: ", kernels);
  TORCH_CHECK_VALUE(weight_q.scalar_type() == at::kChar, "linear_weight_only weights are int8 storage, got ",
                    dtype_name(weight_q.scalar_type()));
  const bool int4 = kernel == "int4pack";
  const bool affine = zero_point.has_value() && zero_point->defined();
  TORCH_CHECK_VALUE(!affine || int4, "linear_weight_only: ", kernel, " takes symmetric weights (no zero point)");
  const int64_t outputs = weight_q.size(0);
  if (int4) {
    check_int4pack(weight_q, scale, group_size, "linear_weight_only");
  } else {
    TORCH_CHECK_VALUE(weight_q.dim() == 2 && scale.numel() == outputs,
                      "linear_weight_only: int8pack takes weights [out, in] with one scale per output, got ",
                      weight_q.sizes(), " and ", scale.numel(), " scales");
  }
  const int64_t depth = x.size(-1);
  TORCH_CHECK_VALUE(depth == weight_q.numel() / std::max<int64_t>(outputs, 1),
                    "linear_weight_only: x has ", depth, " features, the weight ", weight_q.numel() / std::max<int64_t>(outputs, 1));
  const int64_t rows = depth > 0 ? x.numel() / depth : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = outputs;
  const bool native = active_isa() == Isa::Avx512 && has_avx512_bf16();
  at::Tensor y;
  if (int4 && native) {
    static WeightCache cache;
    const Packed packed = cache.get(weight_q, {scale, affine ? *zero_point : at::Tensor()},
                                    [&] { return pack_int4(weight_q, scale, zero_point); });
    if (rows < kGemvRows) {
      return int4_linear(x.reshape({-1, depth}).to(at::kFloat).contiguous(), packed, group_size, bias)
          .to(x.scalar_type())
          .view(shape);
    }
    y = blocked_gemm<at::BFloat16>(x.reshape({-1, depth}).to(at::kBFloat16).contiguous(), outputs, [&](int64_t r0, int64_t r1, at::BFloat16* out) {
      dequantize_int4_rows(packed, r0, r1, depth, group_size, out);
    });
  } else if (!int4 && native && rows >= kGemvRows) {
    const at::Tensor scales = scale.reshape({-1}).to(at::kFloat).contiguous(), weight = weight_q.contiguous();
    y = blocked_gemm<at::BFloat16>(x.reshape({-1, depth}).to(at::kBFloat16).contiguous(), outputs, [&](int64_t r0, int64_t r1, at::BFloat16* out) {
      dequantize_int8_rows(weight.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(), r0, r1, depth, out);
    });
  } else if (rows < kGemvRows) {
    // never fp32 activations into these: ATen's int8pack reads them 20x slower
    const at::Tensor x_bf16 = x.reshape({-1, depth}).to(at::kBFloat16).contiguous();
    if (int4) {
      static WeightCache cache;
      const Packed packed = cache.get(weight_q, {scale, affine ? *zero_point : at::Tensor()},
                                      [&] { return pack_int4_aten(weight_q, scale, zero_point); });
      y = at::_weight_int4pack_mm_for_cpu(x_bf16, packed[0], group_size, packed[1]).narrow(1, 0, outputs);
    } else {
      static WeightCache cache;
      const Packed packed = cache.get(weight_q, scale, [&] { return Packed{scale.reshape({-1}).to(at::kBFloat16).contiguous()}; });
      y = at::_weight_int8pack_mm(x_bf16, weight_q, packed[0]);
    }
  } else {
    const int64_t groups = int4 ? weight_q.size(1) : 1;
    const at::Tensor scales = scale.reshape({outputs, groups}).to(at::kFloat).contiguous(), weight = weight_q.contiguous();
    const at::Tensor zeros = affine ? zero_point->reshape({outputs, groups}).to(at::kFloat).contiguous() : at::Tensor();
    y = blocked_gemm<float>(x.reshape({-1, depth}).to(at::kFloat).contiguous(), outputs, [&](int64_t r0, int64_t r1, float* out) {
      dequantize_fp32_rows(weight.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                           affine ? zeros.const_data_ptr<float>() : nullptr, groups, depth / groups, r0, r1, out);
    });
  }
  y = y.to(x.scalar_type());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  return y.view(shape);
}

}  // namespace qcompile
