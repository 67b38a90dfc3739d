// q = clamp(round(x / S) + Z, qmin, qmax) for one scale and zero point, written as uint8 or int8.
//
// The same integers as qc.quantize's ATen form, bit for bit: x / S is a true fp32 division (not a
// multiply by 1/S, which rounds differently), rounded half to even before Z is added (as ONNX's
// QuantizeLinear does), then clamped. ATen needs four passes over the tensor and a narrowing cast
// that it does not vectorize; here each element is read once and its byte written once.
//
// dequantize_per_tensor is the way back, r = (q − Z)·S in float32, in one pass where ATen's cast,
// subtraction and product take three and two float32 temporaries (2 threads, AMX Xeon, uint8:
// [8, 512, 7, 7] 0.019 ms against 0.06; [4096, 384] 0.24-0.27 against 5.2-5.7).

#include "quantize.h"

#include <ATen/Parallel.h>

#include <type_traits>

#include "isa.h"
#include "simd.h"

namespace qcompile {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

template <typename T>
QC_PORTABLE void quantize_portable(const float* x, T* q, int64_t n, float scale, float zero_point, float qmin,
                                   float qmax) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<T>(quantize_value(x[i], scale, zero_point, qmin, qmax));
}

template <typename T>
QC_AVX512 void quantize_avx512(const float* x, T* q, int64_t n, float scale, float zero_point, float qmin,
                               float qmax) {
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero_point);
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store_quantized(q + i, m, _mm512_maskz_loadu_ps(m, x + i), s, z, lo, hi);
  }
}

template <typename T>
QC_PORTABLE void dequantize_portable(const T* q, float* r, int64_t n, float scale, float zero_point) {
  for (int64_t i = 0; i < n; ++i) r[i] = (static_cast<float>(q[i]) - zero_point) * scale;
}

template <typename T>
QC_AVX512 void dequantize_avx512(const T* q, float* r, int64_t n, float scale, float zero_point) {
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero_point);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m128i bytes = _mm_maskz_loadu_epi8(m, q + i);
    const __m512i k = std::is_same_v<T, uint8_t> ? _mm512_cvtepu8_epi32(bytes) : _mm512_cvtepi8_epi32(bytes);
    _mm512_mask_storeu_ps(r + i, m, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(k), z), s));
  }
}

template <typename T>
void dequantize(const T* q, float* r, int64_t n, float scale, float zero_point) {
  const bool avx512 = active_isa() == Isa::Avx512;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (avx512) {
      dequantize_avx512(q + begin, r + begin, end - begin, scale, zero_point);
    } else {
      dequantize_portable(q + begin, r + begin, end - begin, scale, zero_point);
    }
  });
}

template <typename T>
void quantize(const float* x, T* q, int64_t n, float scale, float zero_point, float qmin, float qmax) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    quantize_span(x + begin, q + begin, end - begin, scale, zero_point, qmin, qmax);
  });
}

}  // namespace

template <typename T>
void quantize_span(const float* x, T* q, int64_t n, float scale, float zero_point, float qmin, float qmax) {
  if (active_isa() == Isa::Avx512) {
    quantize_avx512(x, q, n, scale, zero_point, qmin, qmax);
  } else {
    quantize_portable(x, q, n, scale, zero_point, qmin, qmax);
  }
}

template void quantize_span<uint8_t>(const float*, uint8_t*, int64_t, float, float, float, float);
template void quantize_span<int8_t>(const float*, int8_t*, int64_t, float, float, float, float);

at::Tensor quantize_per_tensor(const at::Tensor& x, double scale, int64_t zero_point, int64_t qmin, int64_t qmax,
                               at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, "quantize_per_tensor writes uint8 or int8, got ", dtype);
  const int64_t lowest = dtype == at::kByte ? 0 : -128, highest = dtype == at::kByte ? 255 : 127;
  TORCH_CHECK(lowest <= qmin && qmin <= qmax && qmax <= highest, "quantize_per_tensor: range [", qmin, ", ", qmax,
              "] does not fit ", dtype);
  // Any dense layout is read as it lies and written in the same strides (a convolution's
  // channels-last output stays channels-last for the next one); only a strided view is copied.
  at::Tensor values = x.to(at::kFloat);
  if (!values.is_non_overlapping_and_dense()) values = values.contiguous();
  at::Tensor q = at::empty_like(values, values.options().dtype(dtype));
  const float s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  if (dtype == at::kByte) {
    quantize(values.data_ptr<float>(), q.data_ptr<uint8_t>(), values.numel(), s, z, qmin, qmax);
  } else {
    quantize(values.data_ptr<float>(), q.data_ptr<int8_t>(), values.numel(), s, z, qmin, qmax);
  }
  return q;
}

at::Tensor dequantize_per_tensor(const at::Tensor& q, double scale, double zero_point) {
  TORCH_CHECK(q.scalar_type() == at::kByte || q.scalar_type() == at::kChar,
              "dequantize_per_tensor reads uint8 or int8, got ", q.scalar_type());
  const at::Tensor codes = q.is_non_overlapping_and_dense() ? q : q.contiguous();
  at::Tensor r = at::empty_like(codes, codes.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  if (codes.scalar_type() == at::kByte) {
    dequantize(codes.const_data_ptr<uint8_t>(), r.data_ptr<float>(), codes.numel(), s, z);
  } else {
    dequantize(codes.const_data_ptr<int8_t>(), r.data_ptr<float>(), codes.numel(), s, z);
  }
  return r;
}

}  // namespace qcompile
