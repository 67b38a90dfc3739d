// The qcompile._native extension: registers the native qc:: operators with torch's dispatcher
// (importing the module is what makes torch.ops.qc.attention and qc.layer_norm_quantize exist), exposes which instruction
// set they run, and the kernels Python ops call directly (qc.quantize's per-tensor path, qc.linear_int8's few-row path).
#include <torch/extension.h>
#include <torch/library.h>

#include "attention.h"
#include "isa.h"
#include "layer_norm_quantize.h"
#include "linear_u8s8.h"
#include "quantize.h"

TORCH_LIBRARY_FRAGMENT(qc, m) {
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float? scale, bool is_causal, "
        "ScalarType out_dtype) -> Tensor");
  m.def("layer_norm_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? multiplier, float scale, "
        "int zero_point, int qmin, int qmax, ScalarType dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qc, CPU, m) {
  m.impl("attention", &qcompile::attention);
  m.impl("layer_norm_quantize", &qcompile::layer_norm_quantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("pack_u8s8_weight", &qcompile::pack_u8s8_weight,
             "(packed, column sums) of an int8 [out, in] weight for linear_u8s8.");
  module.def("has_vnni", &qcompile::has_vnni, "Whether this CPU has AVX512-VNNI.");
  module.def("linear_u8s8", &qcompile::linear_u8s8,
             "S_x·S_W·(x·Wᵀ − Z_x·ΣW) + b (+ other), relu if asked, as float32 / bfloat16 or requantized uint8: "
             "qc.linear_int8 for a few rows.");
  module.def("quantize_per_tensor", &qcompile::quantize_per_tensor,
             "clamp(round(x / scale) + zero_point, qmin, qmax) as uint8 or int8, in one pass (qc.quantize's "
             "per-tensor integer path).");
  module.def("isa", [] { return qcompile::isa_name(qcompile::active_isa()); },
             "The instruction set the native kernels use now: 'avx512' or 'portable'.");
  module.def("detected_isa", [] { return qcompile::isa_name(qcompile::detected_isa()); },
             "The best instruction set this CPU offers the native kernels.");
  module.def(
      "use_isa",
      [](const std::string& name) { qcompile::use_isa(qcompile::isa_named(name)); },
      "Run the native kernels on this instruction set, one this CPU has (tests run every path this way).");
}
