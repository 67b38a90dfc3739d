// oneDNN int8 kernels as qcompile ops, called without a Python frame: each call is checked, finds
// its packed weight and reaches oneDNN (or the u8s8 kernel: on AVX512-VNNI for a few rows, on AMX
// tiles up to kTiledRows) in C++, a few microseconds
// where the Python custom op spent about 20 (measured: one 384x384 row, 23 µs through the Python
// op against 3.6 for the kernel alone).
//
// Contract, checked in tests and at compile time (kernel_check.py) against the reference ops:
//
//   op(x_q, ...) == quantize_out(unary(dequantize(x_q) ⊛ dequantize(w_q) + b [+ other]))
//
// Activations are uint8 with a scale and zero point (one-element tensors, so one op serves static
// scales and scales computed at run time); weights plain int8, symmetric per output channel; bias
// float; `other` an optional residual added before the unary post-op (float for linear, oneDNN's
// binary post-op; for conv2d float, or uint8 read through other_scale / other_zero_point, oneDNN's
// sum post-op); the output float32 / bfloat16 / float16 (for float consumers) or uint8
// requantized with out_scale / out_zero_point (for the next int8 op). conv2d_int8 also takes float
// activations, which it quantizes itself with the activations' scale and zero point, as
// qc.quantize(x, S, Z, None, 0, 255, uint8) would: x_q = quantize(x) in the contract above
// (fuse-conv-input-quantize gives a network's first convolution its float image this way).
//
// Weights are packed on first use and cached per weight tensor (weight_cache.h): oneDNN's blocked
// layout for its GEMM and convolution, VNNI blocks for the few-row kernel. A convolution's layout
// depends on the input's spatial size, so it is packed for the first call's input shape (one packed
// without it is reordered again on every call).

#include "int8_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>

#include "channels_last.h"
#include "isa.h"
#include "linear_u8s8.h"
#include "names.h"
#include "quantize.h"
#include "weight_cache.h"
#include "weight_only.h"

namespace qcompile {
namespace {

// A fused unary epilogue: its name in the graph, and the oneDNN post-op, algorithm and bounds that
// run it. capabilities.py says which of these each op's groups may carry; oneDNN follows a residual
// add with relu only.
struct PostOp {
  std::string_view name, onednn, algorithm;
  bool after_add;
  bool clip6 = false;  // hardtanh's bounds [0, 6]: ReLU6

  c10::IValue args() const {
    c10::List<std::optional<c10::Scalar>> bounds;
    if (clip6) bounds.push_back(c10::Scalar(0.0)), bounds.push_back(c10::Scalar(6.0));
    return bounds;
  }
};
constexpr PostOp kLinearPostOps[] = {
    {"none", "none", "", true}, {"relu", "relu", "", true}, {"relu6", "hardtanh", "", false, true},
    {"gelu", "gelu", "none", false}, {"gelu-tanh", "gelu", "tanh", false}};
constexpr PostOp kConvPostOps[] = {
    {"none", "none", "", true}, {"relu", "relu", "", true}, {"relu6", "hardtanh", "", false, true}};

template <size_t N>
const PostOp& post_op_named(const PostOp (&table)[N], std::string_view kernel, std::string_view name, bool with_add) {
  std::string accepted;
  for (const PostOp& op : table) {
    if (with_add && !op.after_add) continue;
    if (op.name == name) return op;
    accepted += (accepted.empty() ? "" : ", ") + std::string(op.name);
  }
  TORCH_CHECK_VALUE(false, kernel, ": post-op '", name, "'", with_add ? " after a residual add" : "",
                    " is not one it fuses (it fuses: ", accepted, ")");
}

void check_operands(const at::Tensor& x, at::ScalarType out_dtype, std::string_view kernel) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kByte, kernel, " activations must be uint8, got ",
                    dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                        out_dtype == at::kByte,
                    kernel, " output must be float32, bfloat16, float16 or uint8, got ", dtype_name(out_dtype));
}

// What oneDNN writes for out_dtype: it has no float16 epilogue here, so a float16 model's kernels
// write float32, cast once after the kernel; nor, on a CPU without AVX512-BF16 (an AVX2 one: no
// primitive is created), a bfloat16 one.
at::ScalarType kernel_dtype(at::ScalarType out_dtype) {
  if (out_dtype == at::kHalf || (out_dtype == at::kBFloat16 && !has_avx512_bf16())) return at::kFloat;
  return out_dtype;
}

// One of torch's oneDNN operators, called through the dispatcher: found by name on its first call
// and kept, so a kernel call does not look its operator up again.
class OnednnOp {
 public:
  constexpr OnednnOp(const char* name, const char* overload) : name_(name), overload_(overload) {}

  at::Tensor operator()(torch::jit::Stack stack) const {
    std::call_once(found_, [this] { handle_.emplace(c10::Dispatcher::singleton().findSchemaOrThrow(name_, overload_)); });
    handle_->callBoxed(stack);
    return stack[0].toTensor();
  }

 private:
  const char* name_;
  const char* overload_;
  mutable std::once_flag found_;
  mutable std::optional<c10::OperatorHandle> handle_;
};

const OnednnOp kLinearPrepack{"onednn::qlinear_prepack", ""};
const OnednnOp kLinear{"onednn::qlinear_pointwise", "tensor"};
const OnednnOp kLinearAdd{"onednn::qlinear_pointwise", "binary_tensor"};
const OnednnOp kConvPrepack{"onednn::qconv_prepack", ""};
const OnednnOp kConv{"onednn::qconv2d_pointwise", ""};
const OnednnOp kConvSum{"onednn::qconv2d_pointwise", "binary"};

std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return std::nullopt;
  return tensor->to(at::kFloat);
}

// The VNNI kernel's form of an [O, K] int8 matrix: its blocks, column sums and float32 scales.
Packed vnni_packed(const at::Tensor& matrix, const at::Tensor& weight_scale) {
  auto [blocks, column_sums] = pack_u8s8_weight(matrix);
  return Packed{blocks, column_sums, weight_scale.to(at::kFloat).contiguous()};
}

// Without VNNI oneDNN multiplies with vpmaddubsw, which adds each pair of uint8·int8 products in
// saturating int16: exact only while |w| <= 64 (2·255·64 = 32640). cpu-int8 plans 7-bit weights on
// such a CPU; a wider weight (a model compiled on a VNNI CPU) is refused here, once, when it is
// packed, rather than quietly answered with saturated sums.
bool exact_int8_gemm() {
  static const bool exact = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni");
  }();
  return exact;
}

void check_saturation_free(const at::Tensor& weight, std::string_view kernel) {
  if (exact_int8_gemm()) return;
  if (weight.numel() == 0) return;
  // Not abs().max(): abs(-128) wraps to -128 in int8.
  const int64_t widest = std::max(weight.max().item<int64_t>(), -weight.min().item<int64_t>());
  TORCH_CHECK_VALUE(widest <= 64, kernel, ": a weight value of magnitude ", widest,
                    " on a CPU without VNNI, whose u8s8 kernels add pairs of products in saturating int16 (exact "
                    "only for |w| <= 64): the model was quantized for another CPU; compile it again here, where "
                    "cpu-int8 plans int7 weights");
}

// oneDNN's form of a weight: its prepacked tensor, float32 scales and zero weight zero points (its
// GEMM reads them as a tensor), all made once instead of on every call.
Packed onednn_packed(const at::Tensor& prepacked, const at::Tensor& weight_scale) {
  return Packed{prepacked, weight_scale.to(at::kFloat).contiguous(),
                at::zeros({weight_scale.numel()}, weight_scale.options().dtype(at::kLong))};
}

// qc.linear_int8 on the u8s8 kernel (linear_u8s8.cpp): a few rows on VNNI, up to kTiledRows on AMX
// tiles, per-token rows at any count; the weight packed for it once (its static cache).
at::Tensor linear_on_u8s8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                          const at::Tensor& weight, const at::Tensor& weight_scale,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other,
                          double out_scale, int64_t out_zero_point, at::ScalarType out_dtype,
                          std::string_view post_op) {
  static WeightCache cache;
  const Packed packed = cache.get(weight, weight_scale, [&] { return vnni_packed(weight, weight_scale); });
  return linear_u8s8(x, x_scale, x_zero_point, packed[0], packed[1], packed[2], bias, other, post_op, out_scale,
                     out_zero_point, kernel_dtype(out_dtype));
}

// A unary epilogue in ATen ops, for a result computed without it.
at::Tensor apply_unary(const at::Tensor& y, const PostOp& unary) {
  if (unary.name == "relu") return at::relu(y);
  if (unary.name == "relu6") return at::hardtanh(y, 0.0, 6.0);
  if (unary.name == "gelu") return at::gelu(y, "none");
  if (unary.name == "gelu-tanh") return at::gelu(y, "tanh");
  return y;
}

// A float32 result in the output's dtype: uint8 requantized as qc.quantize does, or cast.
at::Tensor in_output_dtype(const at::Tensor& y, double out_scale, int64_t out_zero_point, at::ScalarType out_dtype) {
  return out_dtype == at::kByte ? quantize_per_tensor(y, out_scale, out_zero_point, 0, 255, at::kByte) : y.to(out_dtype);
}

// Activations quantized per token: each row m has its own (S_x[m], Z_x[m]), which oneDNN's int8 GEMM
// cannot take (its source scale is one per tensor). On AVX512-VNNI the u8s8 kernel reads each row's
// pair in its epilogue, at every row count (at 4096 rows of all-MiniLM's shapes it took 0.77-1.25x
// oneDNN's per-tensor time, 2 threads, Zen 4; below 128 rows it is faster). Elsewhere oneDNN
// multiplies with S_x = 1, Z_x = 0 into float,
//   A[m][n] = S_W[n]·Σ_k x[m][k]·W[n][k],
// and ATen finishes each row: y = S_x[m]·A[m][n] − S_x[m]·Z_x[m]·(S_W[n]·Σ_k W[n][k]) + b[n].
// The u8s8 kernel runs every unary epilogue itself; the ATen path finishes with ATen's.
at::Tensor linear_per_token(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                            const at::Tensor& weight, const at::Tensor& weight_scale,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& other,
                            double out_scale, int64_t out_zero_point, at::ScalarType out_dtype, const PostOp& unary) {
  const int64_t k = x.size(-1), rows = k > 0 ? x.numel() / k : 0, n = weight.size(0);
  TORCH_CHECK_VALUE(x_scale.numel() == rows && x_zero_point.numel() == rows,
                    "linear_int8: activations quantized per token take one scale and zero point per row (", rows,
                    "), got ", x_scale.numel(), " and ", x_zero_point.numel());
  if (has_vnni() && active_isa() == Isa::Avx512 && k <= kMaxDepth) {
    return linear_on_u8s8(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point,
                           out_dtype, unary.name)
        .to(out_dtype);
  }
  static WeightCache cache;
  const Packed packed = cache.get(weight, weight_scale, [&] {
    check_saturation_free(weight, "linear_int8");
    Packed made = onednn_packed(kLinearPrepack({weight, c10::IValue()}), weight_scale);
    made.push_back(weight_scale.to(at::kFloat) * weight.sum(1, false, at::kFloat));  // S_W[n]·Σ_k W[n][k]
    return made;
  });
  const at::Tensor sums = kLinear({x.contiguous(), at::ones({}, at::kFloat), at::zeros({}, at::kLong), packed[0],
                                   packed[1], packed[2], c10::IValue(), 1.0, 0, at::kFloat, std::string("none"),
                                   c10::List<std::optional<c10::Scalar>>(), std::string()});
  const at::Tensor scale = x_scale.reshape({rows, 1}).to(at::kFloat);
  at::Tensor y = sums.reshape({rows, n}) * scale - (scale * x_zero_point.reshape({rows, 1}).to(at::kFloat)) * packed[3];
  if (bias.has_value() && bias->defined()) y = y + bias->to(at::kFloat);
  if (other.has_value() && other->defined()) y = y + other->reshape({rows, n}).to(at::kFloat);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return in_output_dtype(apply_unary(y, unary), out_scale, out_zero_point, out_dtype).reshape(shape);
}

// A convolution small enough that oneDNN's fixed cost per call is most of its time, as im2col and
// the VNNI GEMM: each output pixel's window becomes a row of kh·kw·C bytes, tap by tap, each tap
// the pixel's C channels (one copy from a channels-last input; taps outside the input are the zero
// point, which is what a real zero quantizes to, so padding adds exact zeros), multiplied by the
// weight viewed [O, kh·kw·C]. The [pixels, O] result is the output in channels-last order, as
// oneDNN writes it.
at::Tensor conv_small(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                      const at::Tensor& weight, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_h,
                      int64_t out_w, double out_scale, int64_t out_zero_point, at::ScalarType out_dtype,
                      std::string_view post_op) {
  static WeightCache cache;
  const int64_t batch = x.size(0), channels = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t outputs = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  // Rows are padded to whole VNNI steps of 4 inputs, with weight columns of zeros there.
  const int64_t depth = kh * kw * channels, stride_k = (depth + 3) / 4 * 4, rows = batch * out_h * out_w;
  const Packed packed = cache.get(weight, weight_scale, [&] {
    const at::Tensor matrix = weight.permute({0, 2, 3, 1}).reshape({outputs, depth});
    return vnni_packed(at::constant_pad_nd(matrix, {0, stride_k - depth}, 0), weight_scale);
  });
  const int64_t zero_point = x_zero_point.item<int64_t>();
  const at::Tensor input = channels_last_bytes(x);  // [n][h][w][c] in memory
  at::Tensor cols = at::empty({rows, stride_k}, x.options());
  const uint8_t* in = input.const_data_ptr<uint8_t>();
  uint8_t* out = cols.data_ptr<uint8_t>();
  const uint8_t zero = static_cast<uint8_t>(zero_point);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / stride_k);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    int64_t n = r0 / (out_h * out_w), oh = r0 / out_w % out_h, ow = r0 % out_w;  // then stepped, not divided
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* row = out + r * stride_k;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
        for (int64_t j = 0; j < kw; ++j, row += channels) {
          const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
          if (ih >= 0 && ih < h && iw >= 0 && iw < w) {
            const uint8_t* tap = in + ((n * h + ih) * w + iw) * channels;
            for (int64_t c = 0; c < channels; ++c) row[c] = tap[c];
          } else {
            for (int64_t c = 0; c < channels; ++c) row[c] = zero;
          }
        }
      }
      for (int64_t k = depth; k < stride_k; ++k) *row++ = 0;
      if (++ow == out_w) {
        ow = 0;
        if (++oh == out_h) oh = 0, ++n;
      }
    }
  });
  const at::Tensor y = linear_u8s8(cols, x_scale, x_zero_point, packed[0], packed[1], packed[2], bias, std::nullopt,
                                   post_op, out_scale, out_zero_point, kernel_dtype(out_dtype))
                           .contiguous();
  // The same bytes as the [N, C, H, W] tensor they are in channels-last order: a tensor of its own
  // over y's storage rather than a view (which keeps y alive beside it), so that its last reader
  // may hold the only reference to it (conv2d_int8 then sums into it in place).
  return at::empty({0}, y.options())
      .set_(y.storage(), y.storage_offset(), {batch, outputs, out_h, out_w},
            {out_h * out_w * outputs, 1, out_w * outputs, outputs});
}

// Whether `t` may be overwritten: the caller's is the only reference to it and to its memory (no
// view shares it), and it is channels-last contiguous, as oneDNN's sum post-op takes its buffer.
bool owned_channels_last(const at::Tensor& t) {
  return t.use_count() == 1 && t.storage().use_count() == 1 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& other, double out_scale, int64_t out_zero_point,
                       at::ScalarType out_dtype, std::string_view post_op) {
  static constexpr std::string_view kKernel = "linear_int8";
  check_operands(x, out_dtype, kKernel);
  const bool with_add = other.has_value() && other->defined();
  const PostOp& unary = post_op_named(kLinearPostOps, kKernel, post_op, with_add);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar && weight.dim() == 2, "linear_int8 weights must be 2-D int8, got ",
                    dtype_name(weight.scalar_type()), " ", weight.sizes());
  // oneDNN's binary post-op reads `other` in the output's dtype: a float residual would be truncated
  // to bytes. The lowering keeps such a group's output float.
  TORCH_CHECK_VALUE(!(with_add && out_dtype == at::kByte),
                    "linear_int8 adds a float other into a float output only, not a uint8 one");
  const int64_t k = x.size(-1), rows = k > 0 ? x.numel() / k : 0;
  if (x_scale.numel() != 1 || x_zero_point.numel() != 1) {
    return linear_per_token(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point,
                            out_dtype, unary);
  }
  const bool on_tiles = amx_active() && k % kTileDepth == 0 && rows <= kTiledRows;
  if (has_vnni() && active_isa() == Isa::Avx512 && (rows <= kFewRows || on_tiles) && k <= kMaxDepth) {
    return linear_on_u8s8(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point,
                           out_dtype, unary.name)
        .to(out_dtype);
  }
  static WeightCache cache;
  const Packed packed = cache.get(weight, weight_scale, [&] {
    check_saturation_free(weight, kKernel);
    return onednn_packed(kLinearPrepack({weight, c10::IValue()}), weight_scale);
  });
  const at::ScalarType written = kernel_dtype(out_dtype);
  if (written != at::kByte) out_scale = 1.0, out_zero_point = 0;
  // oneDNN reads x and other as dense row-major matrices: a strided view is read as if it were one
  // (garbage), or, for some layouts, taken down a reference path thousands of times slower. Both are
  // copied once here when they are not already dense.
  const at::Tensor scale = x_scale.reshape({}).to(at::kFloat), zero_point = x_zero_point.reshape({}).to(at::kLong);
  at::Tensor y;
  if (!with_add) {
    y = kLinear({x.contiguous(), scale, zero_point, packed[0], packed[1], packed[2], as_float(bias), out_scale, out_zero_point, written, std::string(unary.onednn), unary.args(),
              std::string(unary.algorithm)});
  } else {
    y = kLinearAdd({x.contiguous(), scale, zero_point, packed[0], packed[1], packed[2], other->to(written).contiguous(), as_float(bias), out_scale, out_zero_point, written, 1.0, 0,
              std::string("add"), 1.0, std::string(unary.onednn), unary.args(), std::string(unary.algorithm)});
  }
  return y.to(out_dtype);
}

at::Tensor conv2d_int8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& weight, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& other, double other_scale, int64_t other_zero_point,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       double out_scale, int64_t out_zero_point, at::ScalarType out_dtype, std::string_view post_op) {
  static constexpr std::string_view kKernel = "conv2d_int8";
  if (x.is_floating_point()) {  // quantized here, straight into the channels-last bytes read below
    TORCH_CHECK_VALUE(x.dim() == 4 && x_scale.numel() == 1 && x_zero_point.numel() == 1,
                      "conv2d_int8 quantizes 4-D float activations with one scale and zero point, got ", x.sizes(),
                      " with ", x_scale.numel(), " scales");
    return conv2d_int8(quantize_channels_last(x, x_scale.item<double>(), x_zero_point.item<int64_t>()), x_scale,
                       x_zero_point, weight, weight_scale, bias, other, other_scale, other_zero_point, stride, padding,
                       dilation, groups, out_scale, out_zero_point, out_dtype, post_op);
  }
  check_operands(x, out_dtype, kKernel);
  const bool with_add = other.has_value() && other->defined();
  const PostOp& unary = post_op_named(kConvPostOps, kKernel, post_op, with_add);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar && weight.dim() == 4, "conv2d_int8 weights must be 4-D int8, got ",
                    dtype_name(weight.scalar_type()), " ", weight.sizes());
  const at::ScalarType written = kernel_dtype(out_dtype);
  if (written != at::kByte) out_scale = 1.0, out_zero_point = 0;
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "conv2d_int8: stride, padding and dilation have two entries each");
  const int64_t out_h = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  const int64_t macs = x.size(0) * out_h * out_w * weight.size(0) * (weight.size(1) * weight.size(2) * weight.size(3));
  if (!with_add && groups == 1 && (unary.name == "none" || unary.name == "relu") && has_vnni() &&
      active_isa() == Isa::Avx512 && macs <= kSmallConvMacs &&
      weight.size(1) * weight.size(2) * weight.size(3) <= kMaxDepth) {
    return conv_small(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation, out_h, out_w,
                      out_scale, out_zero_point, out_dtype, unary.name)
        .to(out_dtype);
  }
  const double scale = x_scale.item<double>();
  const int64_t zero_point = x_zero_point.item<int64_t>();
  const at::Tensor input = channels_last_bytes(x);
  static WeightCache cache;
  const Packed packed = cache.get(weight, weight_scale, [&] {
    check_saturation_free(weight, kKernel);
    return onednn_packed(kConvPrepack({weight, weight_scale.to(at::kFloat), scale, zero_point, stride.vec(), padding.vec(),
                               dilation.vec(), groups, x.sizes().vec()}),
                         weight_scale);
  });
  at::Tensor y;
  if (!with_add) {
    y = kConv({input, scale, zero_point, packed[0], packed[1], packed[2], as_float(bias), stride.vec(),
              padding.vec(), dilation.vec(), groups, out_scale, out_zero_point, written, std::string(unary.onednn),
              unary.args(), std::string()});
  } else {
    // oneDNN's sum post-op adds into a buffer of the output's dtype and overwrites it, so the kernel
    // gets its own channels-last copy: uint8 (with its qparams) for a uint8 output, else float. An
    // `other` this call holds the only reference to (the native program hands a value to its last
    // reader), already in that dtype and layout, is that buffer itself: nothing can read it after.
    at::Tensor accumulator;
    if (written == at::kByte) {
      TORCH_CHECK_VALUE(other->scalar_type() == at::kByte, "conv2d_int8 with a uint8 output adds a uint8 other, got ",
                        dtype_name(other->scalar_type()));
      accumulator = owned_channels_last(*other) ? *other : other->clone(at::MemoryFormat::ChannelsLast);
    } else {
      at::Tensor values = *other;
      if (values.scalar_type() == at::kByte) {  // r = S·(q − Z), as qc.dequantize computes it
        values = dequantize_per_tensor(values, other_scale, other_zero_point);
      }
      accumulator = values.scalar_type() == written && owned_channels_last(values)
                        ? values
                        : values.to(written).clone(at::MemoryFormat::ChannelsLast);
      other_scale = 1.0, other_zero_point = 0;
    }
    y = kConvSum({input, scale, zero_point, packed[0], packed[1], packed[2], accumulator, as_float(bias),
              stride.vec(), padding.vec(), dilation.vec(), groups, out_scale, out_zero_point, written, other_scale,
              other_zero_point, std::string("sum"), c10::Scalar(1.0), std::string(unary.onednn), unary.args(),
              std::string()});
  }
  return y.to(out_dtype);
}

}  // namespace qcompile
