// The Q/DQ operators, on plain tensors: int8 / uint8 / int4-in-int8 / int32 or float8 storage,
// float32 scales and int32 zero points, never torch's quantized tensor types.
//
//   quantize:    q = clamp(round(r / S) + Z, qmin, qmax)   (round half to even, as oneDNN and ONNX do)
//                q = fp8(clamp(r / S, -max, max))         (float8 storage: the cast rounds to nearest)
//   dequantize:  r = S · (q − Z)                          (float8: decoded through a 256-entry table)
//
// `axis` is empty for per-tensor parameters (one-element tensors), per-token ones (shaped [..., 1],
// one per row) and per-group ones (a weight viewed [out, groups, size] with parameters
// [out, groups, 1]), the last two broadcast as they are; or the channel axis for per-channel ones.
//
// They are native operators because every int8 kernel's input passes through a quantize: as a
// Python custom op each call cost about 15 µs before any work (measured on a 384-element row),
// more than the kernel it feeds in a decode step. A per-tensor quantize to uint8 / int8, and a
// per-tensor dequantize of them, run as one native pass (quantize.cpp); the other forms are ATen
// ops, in the order that gives those same values.

#include "qdq.h"

#include "names.h"
#include "quantize.h"

namespace qcompile {
namespace {

// 1.5 · 2^23 and its float32 bit pattern: adding it to |v| < 2^22 rounds v half to even (float32
// values near it are exactly 1 apart) and leaves the integer in the low mantissa bits.
constexpr double kRounder = 12582912.0;
constexpr int64_t kRounderBits = 0x4B400000;
constexpr int64_t kRoundingWindow = int64_t{1} << 22;

// A parameter as elementwise ops read it: one value (a per-tensor scale is a scalar operand, the
// fast path of ATen's elementwise kernels: dividing by a 0-dim tensor is an order of magnitude
// slower, with bit-identical results), else a float32 tensor that broadcasts against x.
struct Param {
  std::optional<double> value;
  at::Tensor tensor;
};

Param read_param(const at::Tensor& param, const at::Tensor& x, std::optional<int64_t> axis) {
  if (!axis.has_value() && param.numel() == 1) return {param.item<double>(), {}};
  return {std::nullopt, broadcast_param(param, x, axis).to(at::kFloat)};
}

// The exact float32 value of each of a float8 format's 256 codes (NaN included): ATen converts
// float8 to float element by element, several times slower than looking the byte up.
const at::Tensor& float8_values(at::ScalarType dtype) {
  static const at::Tensor e4m3 = at::arange(256, at::kByte).view(at::kFloat8_e4m3fn).to(at::kFloat);
  static const at::Tensor e5m2 = at::arange(256, at::kByte).view(at::kFloat8_e5m2).to(at::kFloat);
  TORCH_CHECK_VALUE(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2, "qc.dequantize reads float8_e4m3fn or ",
                    "float8_e5m2 storage, got ", dtype_name(dtype));
  return dtype == at::kFloat8_e4m3fn ? e4m3 : e5m2;
}

}  // namespace

at::Tensor broadcast_param(const at::Tensor& param, const at::Tensor& x, std::optional<int64_t> axis) {
  if (!axis.has_value()) {
    if (param.numel() == 1) return param.reshape({});
    const auto leading = x.sizes().slice(0, std::max<int64_t>(x.dim() - 1, 0));
    if (param.dim() == x.dim() && x.dim() > 0 && param.size(-1) == 1 &&
        param.sizes().slice(0, param.dim() - 1) == leading) {
      return param;
    }
    std::vector<int64_t> token_shape(leading.begin(), leading.end());
    token_shape.push_back(1);
    TORCH_CHECK_VALUE(false, "per-tensor quantization needs one scale, got ", param.numel(),
                      " (per-token scales are shaped ", c10::IntArrayRef(token_shape), ")");
  }
  TORCH_CHECK_VALUE(x.dim() > 0, "per-channel parameters need a tensor with an axis, got a 0-dim one");
  const int64_t dim = ((*axis % x.dim()) + x.dim()) % x.dim();
  TORCH_CHECK_VALUE(param.numel() == x.size(dim), "per-channel axis ", dim, " has ", x.size(dim), " channels but ",
                    param.numel(), " parameters");
  std::vector<int64_t> shape(x.dim(), 1);
  shape[dim] = -1;
  return param.reshape(shape);
}

at::Tensor quantize(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                    std::optional<int64_t> axis, int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  const Param s = read_param(scale, x, axis), z = read_param(zero_point, x, axis);
  if (s.value && z.value && (dtype == at::kByte || dtype == at::kChar)) {
    return quantize_per_tensor(x, *s.value, static_cast<int64_t>(*z.value), qmin, qmax, dtype);  // one pass
  }
  // Round before adding Z, as ONNX's QuantizeLinear does: in float32, r/S + Z can land on a .5 tie
  // that r/S did not, and the exported model must give the same integers.
  at::Tensor scaled = s.value ? at::div(x.to(at::kFloat), *s.value) : at::div(x.to(at::kFloat), s.tensor);
  if (at::isFloatingType(dtype)) {  // float8: saturate to the finite range, round to nearest in the cast
    if (!z.value) {
      scaled.add_(z.tensor);
    } else if (*z.value != 0.0) {  // a float8 format's zero point is 0: skip a pass over x
      scaled.add_(*z.value);
    }
    return scaled.clamp_(qmin, qmax).to(dtype);
  }
  if (qmax - qmin >= kRoundingWindow) {  // int32 (bias) ranges: the plain sequence
    scaled.round_();
    z.value ? scaled.add_(*z.value) : scaled.add_(z.tensor);
    return scaled.clamp_(qmin, qmax).to(at::kInt).to(dtype);
  }
  // Four passes and one narrowing cast instead of round, add, clamp and two casts (float -> uint8 is
  // not vectorized in ATen): clamping at 1.5·2^23 + [qmin − Z, qmax − Z] is exact, and the bits
  // minus the constant's bits, plus Z, are q.
  scaled.add_(kRounder);
  if (z.value) {
    scaled.clamp_(kRounder + qmin - *z.value, kRounder + qmax - *z.value);
    return scaled.view(at::kInt).sub_(kRounderBits - static_cast<int64_t>(*z.value)).to(dtype);
  }
  scaled.clamp_(at::rsub(z.tensor, kRounder + qmin), at::rsub(z.tensor, kRounder + qmax));
  return scaled.view(at::kInt).sub_(at::rsub(z.tensor.to(at::kInt), kRounderBits)).to(dtype);
}

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point,
                      std::optional<int64_t> axis, at::ScalarType out_dtype) {
  const Param s = read_param(scale, q, axis), z = read_param(zero_point, q, axis);
  if (s.value && z.value && (q.scalar_type() == at::kByte || q.scalar_type() == at::kChar)) {
    return dequantize_per_tensor(q, *s.value, *z.value).to(out_dtype);  // one pass
  }
  at::Tensor values;
  if (at::isFloat8Type(q.scalar_type())) {
    const at::Tensor codes = q.reshape({-1}).view(at::kByte).to(at::kInt);
    values = float8_values(q.scalar_type()).index_select(0, codes).view(q.sizes());
  } else {
    values = q.to(at::kFloat);
  }
  values = z.value ? at::sub(values, *z.value) : at::sub(values, z.tensor);
  values = s.value ? values.mul_(*s.value) : values.mul_(s.tensor);
  return values.to(out_dtype);
}

}  // namespace qcompile
