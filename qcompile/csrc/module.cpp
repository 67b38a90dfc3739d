// The qcompile._native extension: registers the native qc:: operators with torch's dispatcher
// (importing the module is what makes torch.ops.qc.quantize, dequantize, linear_int8, conv2d_int8, max_pool2d_uint8,
// attention, attention_quantize, layer_norm_quantize, layer_norm_quantize_per_token, rms_norm, rotary, gru_recurrence, lstm_recurrence, linear_weight_only, linear_w4a8, choose_qparams_per_token and quantize_per_token exist), exposes which instruction set they run, the kernels and helpers Python calls directly, and the Program that runs a lowered graph in one call.
#include <torch/extension.h>
#include <torch/library.h>

#include "all_finite.h"
#include "attention.h"
#include "channels_last.h"
#include "choose_qparams.h"
#include "int8_kernels.h"
#include "isa.h"
#include "layer_norm_quantize.h"
#include "linear_u8s8.h"
#include "linear_w4a8.h"
#include "max_pool2d_uint8.h"
#include "program.h"
#include "qdq.h"
#include "quantize.h"
#include "recurrence.h"
#include "rms_norm.h"
#include "rotary.h"
#include "weight_cache.h"
#include "weight_only.h"

TORCH_LIBRARY_FRAGMENT(qc, m) {
  m.def("max_pool2d_uint8(Tensor x, int[] kernel_size, int[] stride, int[] padding) -> Tensor");
  m.def("quantize(Tensor x, Tensor scale, Tensor zero_point, int? axis, int qmin, int qmax, ScalarType dtype) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scale, Tensor zero_point, int? axis, ScalarType out_dtype) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor weight, Tensor weight_scale, Tensor? bias, "
        "Tensor? other, float out_scale, int out_zero_point, ScalarType out_dtype, str post_op) -> Tensor");
  m.def("conv2d_int8(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor weight, Tensor weight_scale, Tensor? bias, "
        "Tensor? other, float other_scale, int other_zero_point, int[] stride, int[] padding, int[] dilation, "
        "int groups, float out_scale, int out_zero_point, ScalarType out_dtype, str post_op) -> Tensor");
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float? scale, bool is_causal, "
        "ScalarType out_dtype) -> Tensor");
  m.def("attention_quantize(Tensor query, Tensor key, Tensor value, Tensor? mask, float? scale, bool is_causal, "
        "Tensor? multiplier, float out_scale, int zero_point, int qmin, int qmax, ScalarType dtype) -> Tensor");
  m.def("layer_norm_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? multiplier, float scale, "
        "int zero_point, int qmin, int qmax, ScalarType dtype) -> (Tensor, Tensor)");
  m.def("layer_norm_quantize_per_token(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? multiplier, int qmin, "
        "int qmax, bool symmetric, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gru_recurrence(Tensor gates_x, Tensor h0, Tensor w_hh, Tensor? b_hh, bool reverse, bool batch_first) "
        "-> (Tensor, Tensor)");
  m.def("lstm_recurrence(Tensor gates_x, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, bool reverse, "
        "bool batch_first) -> (Tensor, Tensor, Tensor)");
  m.def("linear_weight_only(Tensor x, Tensor weight_q, Tensor scale, Tensor? zero_point, int group_size, Tensor? bias, "
        "str kernel) -> Tensor");
  m.def("choose_qparams_per_token(Tensor x, int qmin, int qmax, bool symmetric) -> (Tensor, Tensor)");
  m.def("quantize_per_token(Tensor x, int qmin, int qmax, bool symmetric, ScalarType dtype) -> (Tensor, Tensor, Tensor)");
  m.def("linear_w4a8(Tensor x_q, Tensor x_scale, Tensor x_zero_point, Tensor weight_q, Tensor scale, "
        "Tensor? zero_point, int group_size, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(qc, CPU, m) {
  m.impl("max_pool2d_uint8", &qcompile::max_pool2d_uint8);
  m.impl("quantize", &qcompile::quantize);
  m.impl("dequantize", &qcompile::dequantize);
  m.impl("linear_int8", &qcompile::linear_int8);
  m.impl("conv2d_int8", &qcompile::conv2d_int8);
  m.impl("attention", &qcompile::attention);
  m.impl("attention_quantize", &qcompile::attention_quantize);
  m.impl("layer_norm_quantize", &qcompile::layer_norm_quantize);
  m.impl("layer_norm_quantize_per_token", &qcompile::layer_norm_quantize_per_token);
  m.impl("rms_norm", &qcompile::rms_norm);
  m.impl("rotary", &qcompile::rotary);
  m.impl("gru_recurrence", &qcompile::gru_recurrence);
  m.impl("lstm_recurrence", &qcompile::lstm_recurrence);
  m.impl("linear_weight_only", &qcompile::linear_weight_only);
  m.impl("linear_w4a8", &qcompile::linear_w4a8);
  m.impl("choose_qparams_per_token", &qcompile::choose_qparams_per_token);
  m.impl("quantize_per_token", &qcompile::quantize_per_token);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  qcompile::bind_program(module);
  module.def("pack_u8s8_weight", &qcompile::pack_u8s8_weight,
             "(packed, column sums) of an int8 [out, in] weight for linear_u8s8.");
  module.attr("FEW_ROWS") = qcompile::kFewRows;
  module.attr("TILED_ROWS") = qcompile::kTiledRows;
  module.attr("TILE_MIN_ROWS") = qcompile::kTileMinRows;
  module.def("packs_made", &qcompile::packs_made, "How many weight packs the int8 kernels have made.");
  module.def("packed_weights", &qcompile::packed_weights, "How many live weights the int8 kernels hold packed.");
  module.def("has_vnni", &qcompile::has_vnni, "Whether this CPU has AVX512-VNNI.");
  module.def("has_amx", &qcompile::has_amx, "Whether this CPU has AMX-INT8 tiles the process may use.");
  module.def("amx_active", &qcompile::amx_active, "Whether linear_u8s8 multiplies on AMX tiles now.");
  module.def("use_amx", &qcompile::use_amx, "Turn linear_u8s8's AMX path on or off (on needs has_amx()).");
  module.def("has_avx512_bf16", &qcompile::has_avx512_bf16, "Whether this CPU has AVX512-BF16.");
  module.attr("GEMV_ROWS") = qcompile::kGemvRows;
  module.def("w4a8_in_integers", &qcompile::w4a8_in_integers,
             "Whether qc.linear_w4a8 runs its integer kernel on the active instruction set.");
  module.def("linear_u8s8", &qcompile::linear_u8s8,
             "S_x·S_W·(x·Wᵀ − Z_x·ΣW) + b (+ other), then a unary post-op, as float32 / bfloat16 or requantized uint8: "
             "qc.linear_int8 for a few rows, and per token (S_x, Z_x one per row).");
  module.def("all_finite", &qcompile::all_finite, "Whether x holds no NaN and no infinity (one read of it).");
  module.def("broadcast_param", &qcompile::broadcast_param,
             "A quantization parameter shaped to broadcast against x (0-dim when per tensor).");
  module.def("quantize_per_tensor", &qcompile::quantize_per_tensor,
             "clamp(round(x / scale) + zero_point, qmin, qmax) as uint8 or int8, in one pass (qc.quantize's "
             "per-tensor integer path).");
  module.def("quantize_channels_last", &qcompile::quantize_channels_last,
             "qc.quantize(x, scale, zero_point, None, 0, 255, uint8) of 4-D float values, as channels-last bytes "
             "(what conv2d_int8 does to float activations).");
  module.def("isa", [] { return qcompile::isa_name(qcompile::active_isa()); },
             "The instruction set the native kernels use now: 'avx512', 'avx2' or 'portable'.");
  module.def("detected_isa", [] { return qcompile::isa_name(qcompile::detected_isa()); },
             "The best instruction set this CPU offers the native kernels.");
  module.def(
      "use_isa",
      [](const std::string& name) { qcompile::use_isa(qcompile::isa_named(name)); },
      "Run the native kernels on this instruction set, one this CPU has (tests run every path this way).");
}
