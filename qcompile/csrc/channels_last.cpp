// y[n][h][w][c] = x[n][c][h][w] for a 4-D uint8 tensor.
//
// A network's first convolution reads the quantized image, which is laid out as the float input
// was (N, C, H, W), while oneDNN's int8 convolutions read channels-last bytes. ATen's copy into
// channels-last steps through bytes one at a time with a stride of H·W: 0.74 ms for ResNet-18's
// 8 x 3 x 224 x 224 input on two Zen 4 cores, where oneDNN's own convolution of that input takes
// 3.6; this takes 0.18. Each task takes whole image rows: it reads the row's C channel runs of W
// contiguous bytes and writes the row's W·C output bytes in order, the channel loop unrolled for
// the one to four channels an image has.
//
// quantize_channels_last does the quantize before it in the same pass: a convolution that reads
// the float image (conv2d_int8 given float activations) quantizes each image row's C channel runs
// into a small buffer of C·W bytes (quantize_span: qc.quantize's bits) and interleaves that, so
// the image is read once and its bytes written once, in the order the convolution reads them. On
// AVX-512 the interleave is done in registers, 16 pixels at a time (interleaving_picks): ResNet-18's
// 8 x 3 x 224 x 224 batch takes 0.26-0.32 ms, about what the quantize alone takes, where the
// buffered loop took 0.67.

#include "channels_last.h"

#include <ATen/Parallel.h>

#include <array>
#include <cstring>
#include <vector>

#include "isa.h"
#include "quantize.h"
#include "simd.h"

namespace qcompile {
namespace {

// Output bytes per parallel task, about: less costs more to hand to the second thread than it saves.
constexpr int64_t kGrainBytes = 1 << 15;

// Channels up to which a row is interleaved here.
constexpr int64_t kMaxInterleaved = 4;

// One image row: out[j·C + c] = planes[c·plane + j] for j < width, with C known at compile time.
template <int64_t C>
void interleave_row(const uint8_t* __restrict planes, int64_t plane, int64_t width, uint8_t* __restrict out) {
  for (int64_t j = 0; j < width; ++j) {
    for (int64_t c = 0; c < C; ++c) out[j * C + c] = planes[c * plane + j];
  }
}

// Rows [r0, r1) of an (N, C, H, W) uint8 image, interleaved: row r = n·H + i reads the C runs of W
// bytes at planes + n·C·plane + i·W + c·plane and writes W·C bytes at y + r·W·C.
void interleave_rows(const uint8_t* in, uint8_t* y, int64_t channels, int64_t height, int64_t width, int64_t plane,
                     int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / height, i = r % height;
    const uint8_t* planes = in + n * channels * plane + i * width;
    uint8_t* row = y + r * width * channels;
    switch (channels) {
      case 1: interleave_row<1>(planes, plane, width, row); break;
      case 2: interleave_row<2>(planes, plane, width, row); break;
      case 3: interleave_row<3>(planes, plane, width, row); break;
      default: interleave_row<4>(planes, plane, width, row);
    }
  }
}

// The byte shuffles that interleave 16 pixels of C <= 4 channels on AVX-512: each channel's 16
// quantized bytes are broadcast to the register's four 128-bit lanes, where a byte shuffle can
// place any of them at any byte of its lane; picks[c] puts pixel j of channel c at byte j·C + c
// and zeroes the rest, so the C shuffles OR'ed together are the 16·C bytes in channels-last order.
QC_AVX512 std::array<__m512i, kMaxInterleaved> interleaving_picks(int64_t channels) {
  std::array<__m512i, kMaxInterleaved> picks{};
  for (int64_t c = 0; c < channels; ++c) {
    alignas(64) uint8_t bytes[64];
    for (int64_t p = 0; p < 64; ++p) {
      bytes[p] = (p < 16 * channels && p % channels == c) ? static_cast<uint8_t>(p / channels) : 0x80;
    }
    std::memcpy(&picks[c], bytes, 64);
  }
  return picks;
}

// One image row quantized into channels-last bytes, 16 pixels at a time (the shuffles above).
QC_AVX512 void quantize_row_avx512(const float* planes, int64_t plane, int64_t width, int64_t channels,
                                   const std::array<__m512i, kMaxInterleaved>& picks, float s, float z, uint8_t* out) {
  const __m512 scale = _mm512_set1_ps(s), zero_point = _mm512_set1_ps(z);
  const __m512 lo = _mm512_set1_ps(0.f), hi = _mm512_set1_ps(255.f);
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = tail_mask(width - j);
    __m512i row = _mm512_setzero_si512();
    for (int64_t c = 0; c < channels; ++c) {
      const __m512i q = quantized_lanes(_mm512_maskz_loadu_ps(m, planes + c * plane + j), scale, zero_point, lo, hi);
      row = _mm512_or_si512(row, _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm512_cvtepi32_epi8(q)), picks[c]));
    }
    const int64_t count = std::min<int64_t>(16, width - j) * channels;
    _mm512_mask_storeu_epi8(out + j * channels, count >= 64 ? ~__mmask64{0} : (__mmask64{1} << count) - 1, row);
  }
}

}  // namespace

at::Tensor channels_last_bytes(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kByte, "channels_last_bytes takes 4-D uint8, got ",
                    x.sizes());
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  // Deeper inputs (rare: oneDNN's outputs are channels-last already) take ATen's copy, which
  // measured faster there than a strided loop of this kind (8 x 16 x 224 x 224: 2.2 ms).
  if (x.size(1) > kMaxInterleaved) return x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t plane = height * width;
  const uint8_t* in = input.const_data_ptr<uint8_t>();
  uint8_t* y = out.data_ptr<uint8_t>();
  const int64_t row_bytes = std::max<int64_t>(1, width * channels);
  at::parallel_for(0, batch * height, std::max<int64_t>(1, kGrainBytes / row_bytes), [&](int64_t r0, int64_t r1) {
    interleave_rows(in, y, channels, height, width, plane, r0, r1);
  });
  return out;
}

at::Tensor quantize_channels_last(const at::Tensor& x, double scale, int64_t zero_point) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_floating_point(), "quantize_channels_last takes 4-D float values, got ",
                    x.scalar_type(), " ", x.sizes());
  // Values laid out channels-last already, or too deep to interleave here: the one-pass quantize
  // keeps their layout, then channels_last_bytes (a no-op for the first).
  if (x.size(1) > kMaxInterleaved || !x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return channels_last_bytes(quantize_per_tensor(x, scale, zero_point, 0, 255, at::kByte));
  }
  const at::Tensor values = x.to(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3), plane = height * width;
  const float* in = values.const_data_ptr<float>();
  uint8_t* y = out.data_ptr<uint8_t>();
  const float s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  const int64_t row_bytes = std::max<int64_t>(1, width * channels);
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / row_bytes);
  if (active_isa() == Isa::Avx512) {
    const auto picks = interleaving_picks(channels);
    at::parallel_for(0, x.size(0) * height, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / height, i = r % height;
        quantize_row_avx512(in + n * channels * plane + i * width, plane, width, channels, picks, s, z,
                            y + r * width * channels);
      }
    });
    return out;
  }
  at::parallel_for(0, x.size(0) * height, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> row(channels * width);  // the row's C runs of W bytes, quantized
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / height, i = r % height;
      for (int64_t c = 0; c < channels; ++c) {
        quantize_span(in + (n * channels + c) * plane + i * width, row.data() + c * width, width, s, z, 0.f, 255.f);
      }
      interleave_rows(row.data(), y + r * width * channels, channels, 1, width, width, 0, 1);
    }
  });
  return out;
}

}  // namespace qcompile
