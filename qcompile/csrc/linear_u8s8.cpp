// A uint8 x int8 linear for a few rows, on AVX512-VNNI: what a batch-1 decode step and small
// models run, where oneDNN's per-call cost (about 60-90 µs at one row, measured) dwarfs the math;
// also the GEMM of a small convolution (its pixels' im2col rows, int8_kernels.cpp). On a CPU with
// AMX-INT8 the same product runs on tiles (tiles_amx below), up to a few hundred rows: there
// oneDNN's int8 GEMM took twice as long on request-sized inputs (128 rows of all-MiniLM).
//
//   acc[m][n] = Σ_k x[m][k]·W[n][k]                        (exact int32: VPDPBUSD adds four u8·s8
//                                                             products into int32, no saturation)
//   y[m][n]   = S_x·S_W[n]·(acc[m][n] − Z_x·Σ_k W[n][k]) + b[n] (+ other[m][n]),  then the unary
//               epilogue if asked: relu, relu6 = clamp(y, 0, 6), gelu = y·Φ(y) (erf form) or its
//               tanh approximation
//               (S_x, Z_x one pair for every row, or row m's own: activations quantized per token)
//   out       = y (fp32 / bf16), or clamp(round(y / S_out) + Z_out, 0, 255) as uint8
//
// The weight is packed once (pack_u8s8_weight) into VNNI blocks: 16 output channels x 4 inputs
// per 64 bytes, output channels padded to a multiple of 64 and inputs to a multiple of 4 with
// zeros, with its column sums Σ_k W[n][k] for the zero-point correction. The kernel keeps 4 rows
// x 64 outputs of int32 accumulators in registers (16 independent chains) and streams the weight
// once per 4 rows.

#include "linear_u8s8.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "isa.h"
#include "simd.h"

namespace qcompile {
namespace {

constexpr int64_t kBlock = 16;          // output channels per register
constexpr int64_t kGroup = 4 * kBlock;  // output channels per task step (4 registers)
constexpr int64_t kRowBlock = 64;       // rows per task

// The unary epilogues it runs, by the names qc.linear_int8 gives them.
enum class Unary { kNone, kRelu, kRelu6, kGelu, kGeluTanh };

Unary unary_named(std::string_view name) {
  if (name == "none") return Unary::kNone;
  if (name == "relu") return Unary::kRelu;
  if (name == "relu6") return Unary::kRelu6;
  if (name == "gelu") return Unary::kGelu;
  if (name == "gelu-tanh") return Unary::kGeluTanh;
  TORCH_CHECK_VALUE(false, "linear_u8s8: post-op '", name, "' is not none, relu, relu6, gelu or gelu-tanh");
}

struct Epilogue {
  const float* x_scales;         // row m's S_x at x_scales[m·x_step]
  const int32_t* x_zero_points;  // and its Z_x
  int64_t x_step;                // 0: one pair for all rows; 1: a pair per row
  const float* weight_scale;
  const int32_t* column_sums;
  const float* bias;   // or nullptr
  const float* other;  // [rows][n] or nullptr
  Unary unary;
  at::ScalarType out_dtype;
  float out_scale, out_zero_point;
  void* out;
  int64_t n;
};

// QC_AVX512's features and VNNI: a superset, so the shared AVX-512 helpers inline here.
#define QC_VNNI __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512vnni")))

// float32 -> bfloat16, rounded to nearest even (NaN stays a quiet NaN), as c10::BFloat16(y) does.
QC_VNNI inline __m256i to_bfloat16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// y·Φ(y) = y/2·(1 + erf(y/√2)), erf by Abramowitz and Stegun's 7.1.26 (absolute error below
// 1.5e-7): erf(z) = 1 − t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·e^(−z²), t = 1/(1 + p·z) for
// z >= 0, odd in z. The GELU of a linear's output then differs from ATen's by at most 1e-7·|y|.
QC_VNNI inline __m512 gelu_erf(__m512 y) {
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752f)));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_fmadd_ps(t, _mm512_set1_ps(1.061405429f), _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, t), exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)));
  // 1 + erf(y/√2): 2 − tail above zero, tail below (erf is odd).
  const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.f), tail), tail);
  return _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), one_plus);
}

// y/2·(1 + tanh(u)), u = √(2/π)·(y + 0.044715·y³), with 1 + tanh(u) = 2/(1 + e^(−2u)) taken as
// 2/(1 + e) above zero and 2e/(1 + e) below, e = e^(−2|u|) (never overflows).
QC_VNNI inline __m512 gelu_tanh(__m512 y) {
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(cube, _mm512_set1_ps(0.044715f), y));
  const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(u)));
  const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.f), e);
  const __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 numerator = _mm512_mask_blend_ps(negative, _mm512_set1_ps(2.f), _mm512_add_ps(e, e));
  return _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), _mm512_div_ps(numerator, denominator));
}

// The epilogue of both paths, for `count` rows of one block of 16 outputs (n0 .. n0 + 15, masked at
// the layer's end), their int32 sums `step` apart, in the order of the formula above:
// (S_x·S_W[n])·(acc − Z_x·ΣW[n]) + b[n] (+ other), the unary epilogue, then stored. The block's
// factors are read once (S and the correction once per row when activations are per token), and
// the unary and output type are chosen once per block.
template <Unary U, typename Out>
QC_VNNI void finish_column_as(const Epilogue& e, const int32_t* acc, int64_t step, int64_t r0, int64_t count,
                              int64_t n0) {
  const __mmask16 m = tail_mask(e.n - n0);
  const __m512i sums = _mm512_maskz_loadu_epi32(m, e.column_sums + n0);
  const __m512 weight_scale = _mm512_maskz_loadu_ps(m, e.weight_scale + n0);
  const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + n0) : _mm512_setzero_ps();
  __m512i correction = _mm512_mullo_epi32(_mm512_set1_epi32(e.x_zero_points[0]), sums);
  __m512 scale = _mm512_mul_ps(_mm512_set1_ps(e.x_scales[0]), weight_scale);
  const __m512 out_scale = _mm512_set1_ps(e.out_scale), out_zero_point = _mm512_set1_ps(e.out_zero_point);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = r0 + i;
    if (e.x_step) {
      correction = _mm512_mullo_epi32(_mm512_set1_epi32(e.x_zero_points[row]), sums);
      scale = _mm512_mul_ps(_mm512_set1_ps(e.x_scales[row]), weight_scale);
    }
    __m512 y = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + i * step), correction)));
    if (e.bias) y = _mm512_add_ps(y, bias);
    const int64_t at = row * e.n + n0;
    if (e.other) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, e.other + at));
    if constexpr (U == Unary::kRelu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    if constexpr (U == Unary::kRelu6) y = _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), _mm512_set1_ps(6.f));
    if constexpr (U == Unary::kGelu) y = gelu_erf(y);
    if constexpr (U == Unary::kGeluTanh) y = gelu_tanh(y);
    if constexpr (std::is_same_v<Out, uint8_t>) {
      store_quantized(static_cast<uint8_t*>(e.out) + at, m, y, out_scale, out_zero_point, _mm512_setzero_ps(),
                      _mm512_set1_ps(255.f));
    } else if constexpr (std::is_same_v<Out, c10::BFloat16>) {
      _mm256_mask_storeu_epi16(static_cast<c10::BFloat16*>(e.out) + at, m, to_bfloat16(y));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(e.out) + at, m, y);
    }
  }
}

template <Unary U>
QC_VNNI void finish_column_unary(const Epilogue& e, const int32_t* acc, int64_t step, int64_t r0, int64_t count,
                                 int64_t n0) {
  if (e.out_dtype == at::kByte) return finish_column_as<U, uint8_t>(e, acc, step, r0, count, n0);
  if (e.out_dtype == at::kBFloat16) return finish_column_as<U, c10::BFloat16>(e, acc, step, r0, count, n0);
  finish_column_as<U, float>(e, acc, step, r0, count, n0);
}

QC_VNNI void finish_column(const Epilogue& e, const int32_t* acc, int64_t step, int64_t r0, int64_t count,
                           int64_t n0) {
  switch (e.unary) {
    case Unary::kNone: return finish_column_unary<Unary::kNone>(e, acc, step, r0, count, n0);
    case Unary::kRelu: return finish_column_unary<Unary::kRelu>(e, acc, step, r0, count, n0);
    case Unary::kRelu6: return finish_column_unary<Unary::kRelu6>(e, acc, step, r0, count, n0);
    case Unary::kGelu: return finish_column_unary<Unary::kGelu>(e, acc, step, r0, count, n0);
    case Unary::kGeluTanh: return finish_column_unary<Unary::kGeluTanh>(e, acc, step, r0, count, n0);
  }
}

// Rows r0 .. r0 + R - 1 through B registers of 16 output channels of one group (64): B < 4 only for
// the last group of a layer with fewer outputs left (a small convolution's 8 or 16 channels).
template <int R, int B>
QC_VNNI void group_vnni(const uint8_t* x, int64_t k_pad, const int8_t* packed, int64_t group, int64_t r0,
                        const Epilogue& e) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  const int8_t* w = packed + group * 4 * k_pad * kBlock;  // 4 blocks, each [k_pad/4][16][4]
  const int64_t block_bytes = k_pad * kBlock;
  for (int64_t k = 0; k < k_pad; k += 4) {
    __m512i wb[B];
    for (int b = 0; b < B; ++b) wb[b] = _mm512_loadu_si512(w + b * block_bytes + k * kBlock);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + (r0 + r) * k_pad + k, sizeof four);
      const __m512i xb = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xb, wb[b]);
    }
  }
  alignas(64) int32_t sums[R][kGroup];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) _mm512_store_si512(&sums[r][b * kBlock], acc[r][b]);
  const int64_t n0 = group * kGroup;
  for (int b = 0; b < B; ++b) finish_column(e, &sums[0][b * kBlock], kGroup, r0, R, n0 + b * kBlock);
}

template <int B>
QC_VNNI void rows_of_width(const uint8_t* x, int64_t r0, int64_t r1, int64_t k_pad, const int8_t* packed,
                           int64_t group, const Epilogue& e) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) group_vnni<4, B>(x, k_pad, packed, group, r, e);
  for (; r < r1; ++r) group_vnni<1, B>(x, k_pad, packed, group, r, e);
}

// Rows r0 .. r1 - 1 through one group of outputs, as many registers of it as hold outputs.
QC_VNNI void rows_vnni(const uint8_t* x, int64_t r0, int64_t r1, int64_t k_pad, const int8_t* packed, int64_t group,
                       const Epilogue& e) {
  switch (std::min<int64_t>(4, (e.n - group * kGroup + kBlock - 1) / kBlock)) {
    case 1: return rows_of_width<1>(x, r0, r1, k_pad, packed, group, e);
    case 2: return rows_of_width<2>(x, r0, r1, k_pad, packed, group, e);
    case 3: return rows_of_width<3>(x, r0, r1, k_pad, packed, group, e);
    default: return rows_of_width<4>(x, r0, r1, k_pad, packed, group, e);
  }
}

// The same product on AMX tiles (TDPBUSD: a 16x64 uint8 tile times a 16x64 int8 tile in VNNI order
// accumulates a 16x16 int32 tile, 16384 multiply-adds an instruction). The packed weight is already
// in the B tile's order: a block of 16 output channels is [k_pad/4][16][4] bytes, so its 64 inputs
// from k are 16 rows of 64 bytes at stride 64. A task is 32 rows x 32 outputs: tiles 0-3 hold the
// 2x2 int32 accumulators, 4-5 two 16-row slices of x, 6-7 two 16-channel blocks of the weight, so
// each loaded tile feeds two products. Inputs come 64 at a time (k_pad a multiple of 64) and rows
// 32 at a time (the caller pads x); the int32 tiles are stored and finished by finish_column, as
// the VNNI path's registers are.
#define QC_AMX __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512vnni,amx-tile,amx-int8")))

constexpr int64_t kTileHeight = 16;  // rows of an A or C tile, and 4-byte rows of a B tile (kTileDepth bytes each)
constexpr int64_t kAmxRows = 2 * kTileHeight, kAmxOutputs = 2 * kBlock;

// The tile configuration LDTILECFG reads (palette 1): every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

QC_AMX void tiles_amx(const uint8_t* x, int64_t k_pad, const int8_t* packed, int64_t rows, int64_t t0, int64_t t1,
                      int64_t column_tasks, const Epilogue& e) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = kTileDepth, config.rows[t] = kTileHeight;
  _tile_loadconfig(&config);
  alignas(64) int32_t acc[kAmxRows][kAmxOutputs];
  const int64_t block_bytes = k_pad * kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t / column_tasks * kAmxRows, n0 = t % column_tasks * kAmxOutputs;
    const uint8_t* a = x + r0 * k_pad;
    const int8_t* b = packed + n0 / kBlock * block_bytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < k_pad; k += kTileDepth) {
      _tile_loadd(4, a + k, k_pad);
      _tile_loadd(5, a + kTileHeight * k_pad + k, k_pad);
      _tile_loadd(6, b + k * kBlock, kTileDepth);
      _tile_loadd(7, b + block_bytes + k * kBlock, kTileDepth);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    constexpr int64_t stride = kAmxOutputs * sizeof(int32_t);
    _tile_stored(0, &acc[0][0], stride);
    _tile_stored(1, &acc[0][kBlock], stride);
    _tile_stored(2, &acc[kTileHeight][0], stride);
    _tile_stored(3, &acc[kTileHeight][kBlock], stride);
    const int64_t live_rows = std::min(kAmxRows, rows - r0);
    for (int64_t j = 0; j < kAmxOutputs && n0 + j < e.n; j += kBlock) {
      finish_column(e, &acc[0][j], kAmxOutputs, r0, live_rows, n0 + j);
    }
  }
  _tile_release();
}

// Linux hands a process the AMX tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); without it the first tile instruction faults.
bool amx_permitted() {
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

std::atomic<bool>& amx_enabled() {
  static std::atomic<bool> enabled{has_amx()};
  return enabled;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_u8s8_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_u8s8_weight: a 2-D int8 weight, got ",
              weight.scalar_type(), " ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), n_pad = round_up(std::max<int64_t>(n, 1), kGroup),
                k_pad = round_up(std::max<int64_t>(k, 1), 4);
  at::Tensor packed = at::zeros({n_pad * k_pad}, w.options());
  at::Tensor sums = at::zeros({n}, w.options().dtype(at::kInt));
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* column_sums = sums.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t block = i / kBlock, lane = i % kBlock;
    for (int64_t j = 0; j < k; ++j) {
      dst[block * k_pad * kBlock + (j / 4) * kBlock * 4 + lane * 4 + j % 4] = src[i * k + j];
      column_sums[i] += src[i * k + j];
    }
  }
  return {packed, sums};
}

bool has_amx() {
  static const bool amx = [] {
    __builtin_cpu_init();
    return has_vnni() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && amx_permitted();
  }();
  return amx;
}

void use_amx(bool enabled) {
  TORCH_CHECK(!enabled || has_amx(), "linear_u8s8: this CPU (or its kernel) offers no AMX-INT8 tiles");
  amx_enabled().store(enabled, std::memory_order_relaxed);
}

bool amx_active() { return amx_enabled().load(std::memory_order_relaxed); }

bool has_vnni() {
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return vnni;
}

at::Tensor linear_u8s8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& packed, const at::Tensor& column_sums, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other,
                       std::string_view post_op,
                       double out_scale, int64_t out_zero_point, at::ScalarType out_dtype) {
  TORCH_CHECK(x.scalar_type() == at::kByte, "linear_u8s8: activations must be uint8, got ", x.scalar_type());
  const int64_t n = column_sums.numel(), k = x.size(-1), rows = x.numel() / std::max<int64_t>(k, 1);
  const int64_t k_pad = round_up(std::max<int64_t>(k, 1), 4), groups = round_up(std::max<int64_t>(n, 1), kGroup) / kGroup;
  TORCH_CHECK(packed.numel() == groups * kGroup * k_pad, "linear_u8s8: the packed weight is for another input width");
  TORCH_CHECK(k_pad <= kMaxDepth, "linear_u8s8: ", k, " inputs; its int32 sums hold up to ", kMaxDepth);
  const int64_t pairs = x_scale.numel();
  TORCH_CHECK((pairs == 1 || pairs == rows) && x_zero_point.numel() == pairs,
              "linear_u8s8: one activation scale and zero point, or one per row (", rows, "), got ", pairs, " and ",
              x_zero_point.numel());
  const at::Tensor scales = x_scale.to(at::kFloat).contiguous(), zero_points = x_zero_point.to(at::kInt).contiguous();
  TORCH_CHECK(weight_scale.numel() == n && weight_scale.scalar_type() == at::kFloat,
              "linear_u8s8: one float32 weight scale per output channel");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kByte,
              "linear_u8s8: output float32, bfloat16 or uint8, got ", out_dtype);
  const bool tiles = amx_active() && k_pad % kTileDepth == 0 && rows >= kTileMinRows;
  const int64_t rows_pad = tiles ? round_up(rows, kAmxRows) : rows;
  at::Tensor xs = x.reshape({rows, k});
  if (k_pad != k || rows_pad != rows) xs = at::constant_pad_nd(xs, {0, k_pad - k, 0, rows_pad - rows}, 0);
  xs = xs.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options().dtype(out_dtype));
  at::Tensor b, o;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  if (other.has_value() && other->defined()) {
    TORCH_CHECK(other->numel() == rows * n, "linear_u8s8: other must have the output's ", rows * n, " elements");
    o = other->to(at::kFloat).contiguous();
  }
  Epilogue e{scales.const_data_ptr<float>(), zero_points.const_data_ptr<int32_t>(), pairs == 1 ? 0 : 1,
             weight_scale.data_ptr<float>(),
             column_sums.data_ptr<int32_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
             o.defined() ? o.data_ptr<float>() : nullptr, unary_named(post_op), out_dtype, static_cast<float>(out_scale),
             static_cast<float>(out_zero_point), out.data_ptr(), n};
  TORCH_CHECK(active_isa() == Isa::Avx512 && has_vnni(),
              "linear_u8s8 runs on AVX512-VNNI only (this CPU, or the ISA the kernels are held to, lacks it)");
  const uint8_t* xp = xs.data_ptr<uint8_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  if (tiles) {
    const int64_t column_tasks = (n + kAmxOutputs - 1) / kAmxOutputs;
    const int64_t grain = std::max<int64_t>(1, (1 << 17) / (kAmxRows * kAmxOutputs * k_pad));
    at::parallel_for(0, rows_pad / kAmxRows * column_tasks, grain, [&](int64_t t0, int64_t t1) {
      tiles_amx(xp, k_pad, wp, rows, t0, t1, column_tasks, e);
    });
    return out;
  }
  // Tasks are (block of up to kRowBlock rows, group of 64 outputs), a block's groups in a row so
  // its rows stay in cache: a small convolution (many pixel rows, few outputs) splits by rows.
  // A task is at least 2^17 multiply-adds: waking a second thread for less costs more than it saves.
  const int64_t row_blocks = std::max<int64_t>(1, (rows + kRowBlock - 1) / kRowBlock);
  const int64_t task_rows = std::min(rows, kRowBlock);
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, task_rows * k_pad * kGroup));
  at::parallel_for(0, row_blocks * groups, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t block = t / groups;
      rows_vnni(xp, block * kRowBlock, std::min(rows, (block + 1) * kRowBlock), k_pad, wp, t % groups, e);
    }
  });
  return out;
}

}  // namespace qcompile
