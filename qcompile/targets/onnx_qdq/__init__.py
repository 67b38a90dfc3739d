"""onnx-qdq: the Q/DQ graph as an ONNX QDQ file that ONNX Runtime fuses into its int8 kernels.

* ``arrange``: passes that arrange the export's copy for ONNX Runtime's optimizer
  (``onnx-float-matmul-biases``, ``onnx-residual-sums``, ``onnx-float8-relu-as-max``);
* ``export``: the exporter (``export_onnx``), loaded on first use (it imports onnxscript);
* ``check``: the ONNX Runtime cross-check of every file written;
* the target: op rules and pipelines (the model runs as its Q/DQ graph in torch).
"""

from qcompile.qconfig import int8_preset
from qcompile.spec import FLOAT8_DTYPES, PerTensor
from qcompile.targets.base import CONVERT, PREPARE, OpRule, Target, register_target
from qcompile.targets.cpu_features import U8S8_NARROWING_REASON, u8s8_weight_bits
from qcompile.targets.onnx_qdq.arrange import BlockedWeights, Float8ReluAsMax, FloatMatmulBiases, ResidualAddsAsSums

# ONNX Runtime's U8S8 kernels saturate like oneDNN's on a CPU without VNNI, and every file is
# cross-checked here: a weight multiplied with uint8 activations is planned int7 on such a CPU.
_U8S8 = {"weight_bits": u8s8_weight_bits(), "narrowing_reason": U8S8_NARROWING_REASON}
_WEIGHTS = ("int8", "int7", *FLOAT8_DTYPES)

register_target(
    Target(
        name="onnx-qdq",
        description="ONNX QDQ for ONNX Runtime (export_onnx): uint8 activations, int8 per-channel weights, "
                    "residual adds between convolutions in int8 so that they fuse into QLinearConv/QLinearAdd",
        op_rules={
            # FP8 QDQ (opset 19+) runs in ONNX Runtime's CPU provider unfused; GPU runtimes fuse it.
            "linear": OpRule(activation_dtypes=("uint8", *FLOAT8_DTYPES), weight_dtypes=_WEIGHTS,
                             activation_granularities=(PerTensor,), **_U8S8),
            # QLinearConv: ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear only, so a
            # convolution read in float (SiLU, squeeze-excite, the model's output) quantizes its output.
            "conv2d": OpRule(activation_dtypes=("uint8", *FLOAT8_DTYPES), weight_dtypes=_WEIGHTS,
                             quantized_output=True, **_U8S8),
            "embedding": OpRule(activations=(), weight=0, bias=None, weight_dtypes=("int8", *FLOAT8_DTYPES),
                                lookup_indices=1),
            # QLinearAdd: between int8 convolutions, and in a chain of residual adds (MobileNet's
            # blocks add onto the previous block's sum, with no ReLU between).
            "add": OpRule(activations=(0, 1), weight=None, bias=None,
                          producers=("conv2d", "relu", "max_pool2d", "add")),
        },
        preset=int8_preset,
        prepare=PREPARE,
        convert=CONVERT,
        lower="eliminate-dead-code",  # the model runs as its Q/DQ graph; ONNX Runtime runs the file
        unlowered="Q/DQ for ONNX Runtime (export_onnx)",
        passes=(BlockedWeights, FloatMatmulBiases, ResidualAddsAsSums, Float8ReluAsMax),
    )
)


__all__ = ["BlockedWeights", "Float8ReluAsMax", "FloatMatmulBiases", "ResidualAddsAsSums"]
