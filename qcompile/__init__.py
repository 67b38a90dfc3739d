"""qcompile: a quantization compiler for PyTorch.

One ATen-level fx graph from ``torch.export``, pure passes under a pass manager, and lowering to
real int8 kernels or ONNX QDQ. This module is the public API, the same one built-in passes use.
"""

from qcompile import ops  # noqa: F401  (registers qc.quantize / qc.dequantize; targets register their kernels)
from qcompile.api import QuantizedModel, compile, load
from qcompile.calibration import calibrate
from qcompile.capture import capture
from qcompile.errors import (
    ArtifactError,
    CalibrationError,
    CaptureError,
    InputError,
    KernelMismatchError,
    NodeError,
    PassError,
    PipelineOrderError,
    PipelineParseError,
    QCompileError,
    VerificationError,
)
from qcompile.instruments import DumpIR, NumericCheck, SkipPass, Timing, Verify
from qcompile.ir.graph import (
    add_constant,
    aliases,
    constant_value,
    copy_graph_module,
    copy_source_meta,
    describe_node,
    fetch_attr,
    infer_fake_value,
    insert_call,
    is_mutating,
    op_arguments,
    remove_dead_nodes,
    returns_alias,
)
from qcompile.ir.meta import (
    STANDS_FOR,
    EdgeQuant,
    Fusion,
    Provenance,
    QuantAnnotation,
    get_fusion,
    get_provenance,
    get_qspec,
    set_fusion,
    set_provenance,
    set_qspec,
    source_module,
    stand_ins,
)
from qcompile.ir.parser import IRParseError, parse_graph
from qcompile.ir.printer import canonical_order, diff_graphs, print_graph
from qcompile.ir.verify import register_invariant, verify_graph
from qcompile.kernel_check import check_kernels, register_kernel
from qcompile.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    Observer,
    make_observer,
)
from qcompile.context import CompileContext
from qcompile.decoder import QuantizedDecoder, compile_decoder, greedy_decode
from qcompile.pass_manager import PassManager
from qcompile.passes import BUILTIN_PASSES
from qcompile.pipeline import (
    Diagnostic,
    Instrument,
    Pass,
    PassRecord,
    PassResult,
    Pipeline,
    PipelineResult,
    register_pass,
    registered_passes,
)
from qcompile.qat import Distillation, QatModel, convert_qat, prepare_qat
from qcompile.qconfig import Candidate, OpQuantConfig, QConfig, fp8_qconfig, int8_preset
from qcompile.qdq import observation_root
from qcompile.report import CompileReport, NodeReport, sqnr_db
from qcompile.sensitivity import Sensitivity, output_cosine, sensitivity
from qcompile.rewrite import (
    Match,
    Rule,
    RuleSet,
    RuleTracer,
    apply_rule_set,
    register_rule_set,
    trace_rules,
)
from qcompile.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, compute_qparams
from qcompile.targets import OpRule, Target, get_target, register_target, targets

__all__ = [
    "BUILTIN_PASSES",
    "Candidate",
    "Sensitivity",
    "output_cosine",
    "sensitivity",
    "CompileContext",
    "QuantizedDecoder",
    "compile_decoder",
    "greedy_decode",
    "Diagnostic",
    "ArtifactError",
    "CalibrationError",
    "CaptureError",
    "CompileReport",
    "DumpIR",
    "EdgeQuant",
    "Fusion",
    "HistogramObserver",
    "IRParseError",
    "InputError",
    "Instrument",
    "KernelMismatchError",
    "Match",
    "MinMaxObserver",
    "MovingAverageObserver",
    "NodeError",
    "NodeReport",
    "NumericCheck",
    "Observer",
    "OpQuantConfig",
    "OpRule",
    "Pass",
    "PassError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "Pipeline",
    "PipelineOrderError",
    "PipelineParseError",
    "PipelineResult",
    "Provenance",
    "QCompileError",
    "QConfig",
    "QuantAnnotation",
    "QuantSpec",
    "QuantizedModel",
    "QatModel",
    "Distillation",
    "prepare_qat",
    "convert_qat",
    "Rule",
    "RuleSet",
    "RuleTracer",
    "STANDS_FOR",
    "SkipPass",
    "Target",
    "Timing",
    "VerificationError",
    "Verify",
    "add_constant",
    "aliases",
    "apply_rule_set",
    "calibrate",
    "check_kernels",
    "canonical_order",
    "capture",
    "compile",
    "compute_qparams",
    "constant_value",
    "copy_graph_module",
    "copy_source_meta",
    "describe_node",
    "export_onnx",
    "OnnxExport",
    "CrossCheck",
    "diff_graphs",
    "fetch_attr",
    "get_fusion",
    "get_provenance",
    "get_qspec",
    "get_target",
    "infer_fake_value",
    "insert_call",
    "fp8_qconfig",
    "int8_preset",
    "is_mutating",
    "load",
    "make_observer",
    "observation_root",
    "op_arguments",
    "parse_graph",
    "print_graph",
    "register_invariant",
    "register_kernel",
    "register_pass",
    "register_rule_set",
    "register_target",
    "registered_passes",
    "remove_dead_nodes",
    "returns_alias",
    "set_fusion",
    "set_provenance",
    "set_qspec",
    "source_module",
    "stand_ins",
    "sqnr_db",
    "targets",
    "trace_rules",
    "verify_graph",
]

_ONNX_EXPORT = ("export_onnx", "OnnxExport", "CrossCheck")


def __getattr__(name: str):
    """The ONNX exporter loads onnxscript, so it is imported on first use, not with qcompile."""
    if name in _ONNX_EXPORT:
        from qcompile.targets.onnx_qdq import check, export

        return getattr(export, name, None) or getattr(check, name)
    raise AttributeError(f"module 'qcompile' has no attribute '{name}'")
