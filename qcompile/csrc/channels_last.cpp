// y[n][h][w][c] = x[n][c][h][w] for a 4-D uint8 tensor.
//
// A network's first convolution reads the quantized image, which is laid out as the float input
// was (N, C, H, W), while oneDNN's int8 convolutions read channels-last bytes. ATen's copy into
// channels-last steps through bytes one at a time with a stride of H·W: 0.74 ms for ResNet-18's
// 8 x 3 x 224 x 224 input on two Zen 4 cores, where oneDNN's own convolution of that input takes
// 3.6; this takes 0.18. Each task takes whole image rows: it reads the row's C channel runs of W
// contiguous bytes and writes the row's W·C output bytes in order, the channel loop unrolled for
// the one to four channels an image has.

#include "channels_last.h"

#include <ATen/Parallel.h>

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
  });
  return out;
}

}  // namespace qcompile
