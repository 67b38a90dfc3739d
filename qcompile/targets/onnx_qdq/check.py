"""Cross-check an exported ONNX QDQ file against the Q/DQ graph it came from, in ONNX Runtime.

Comparing only final outputs would not work: a quantized network is chaotic. A float
difference of one part in a million (another summation order, another exp) flips a rounding
somewhere, the flipped integer is a whole step off, and the flips grow layer by layer; on
all-MiniLM-L6-v2 two attention backends *inside torch* already differ by several output steps.
So the check is local. ONNX Runtime runs the file with every QuantizeLinear output exposed;
torch then runs the Q/DQ graph with each quantize node *replaced by ONNX Runtime's integers*
(teacher forcing), so every quantized tensor and every output is computed from the same
integer inputs on both sides. An honest export differs by at most one step (a rounding tie);
a wrong axis, zero point or op translation differs by many, at the first tensor it touches,
and that is the tensor the error names.

Blocked 4-bit weights are written as ONNX Runtime's ``MatMulNBits`` (:mod:`.matmul_nbits`),
each with an ``accuracy_level``: at 4 it quantizes its activations to int8 per block, which the
Q/DQ graph does not. The check runs the file with every such node at level 1 (float activations,
the Q/DQ graph's arithmetic) and, given the levels the file is written with, runs it once more
at those to report how far its outputs move.

Differences are in units of the tensor's quantization step: its scale for quantized tensors,
and for a float output the step a uint8 quantization of it would have, (max − min) / 255. A
float8 tensor's step depends on the magnitude, so there the unit is one code: the distance
between two values is how many representable float8 values lie between them (a float8 byte's
magnitude bits count up with the value, so the distance is the difference of the signed codes).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from qcompile.errors import QCompileError
from qcompile.ir.graph import constant_value
from qcompile.qdq import QUANTIZE, DequantizeCall, QuantizeCall
from qcompile.report import flat_inputs
from qcompile.spec import FLOAT8_STORAGE as FLOAT8
from qcompile.targets.onnx_qdq.matmul_nbits import FLOAT_ACTIVATIONS, INT8_ACTIVATIONS, AccuracyLevel, set_accuracy_levels

# ONNX Runtime's integer kernels, the ops its QDQ optimizer fuses Q/DQ groups into.
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "QAttention", "MatMulInteger", "ConvInteger",
})
FLOAT_COMPUTE = frozenset({"Conv", "MatMul", "Gemm", "FusedMatMul", "FusedConv", "ConvTranspose", "LSTM", "GRU",
                           "RNN", "Einsum"})
# The integer kernels that compute a weight op (a convolution or a matrix product with weights).
WEIGHT_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulInteger",
                            "ConvInteger", "QAttention"})
# ONNX Runtime's weight-only kernel, fused from a constant 4-bit blocked DequantizeLinear into a MatMul.
MATMUL_NBITS = "MatMulNBits"


@dataclass
class TensorCheck:
    name: str
    kind: str  # "quantized" (a QuantizeLinear output) or "output" (a graph output)
    step: float
    max_steps: float
    mismatched: float  # fraction of elements that differ at all


@dataclass
class CrossCheck:
    tensors: list[TensorCheck]
    tolerance_steps: float
    ort_ops: dict[str, int]  # op counts of ONNX Runtime's optimized graph
    # With MatMulNBits: each node's accuracy level as written, and the outputs' largest distance,
    # in steps, between the file at those levels and at float activations (the checked one).
    accuracy_levels: tuple[AccuracyLevel, ...] = ()
    accuracy_level_steps: float | None = None
    # The Q/DQ graph's dequantize nodes whose weights ONNX Runtime's float Conv/MatMul/Gemm read.
    float_weight_reads: tuple[str, ...] = ()

    @property
    def worst(self) -> TensorCheck:
        return max(self.tensors, key=lambda t: t.max_steps)

    @property
    def diverged(self) -> TensorCheck | None:
        return next((t for t in self.tensors if t.max_steps > self.tolerance_steps), None)

    @property
    def int8_weight_kernels(self) -> int:
        return sum(n for op, n in self.ort_ops.items() if op in WEIGHT_KERNELS)

    @property
    def int8_kernels(self) -> dict[str, int]:
        return {op: n for op, n in self.ort_ops.items() if op in INT8_KERNELS}

    def __str__(self) -> str:
        quantized = [t for t in self.tensors if t.kind == "quantized"]
        worst = self.worst
        fused = ", ".join(f"{op} x{n}" for op, n in sorted(self.int8_kernels.items())) or "none"
        floats = ", ".join(f"{op} x{n}" for op, n in sorted(self.ort_ops.items()) if op in FLOAT_COMPUTE) or "none"
        lines = [
            f"ONNX Runtime cross-check: {len(quantized)} quantized tensors and "
            f"{len(self.tensors) - len(quantized)} outputs compared, worst '{worst.name}' "
            f"{worst.max_steps:.3g} steps (tolerance {self.tolerance_steps:g})",
            f"ONNX Runtime int8 kernels: {fused}; float compute left: {floats}",
        ]
        if self.accuracy_levels:
            int8 = [level for level in self.accuracy_levels if level.level == INT8_ACTIVATIONS]
            lines.append(f"ONNX Runtime weight-only kernels: {MATMUL_NBITS} x{len(self.accuracy_levels)} (4-bit blocked "
                         f"weights), checked with float activations; written with accuracy_level {INT8_ACTIVATIONS} "
                         f"(int8 activations) on {len(int8)} and {FLOAT_ACTIVATIONS} on the others, which moves the "
                         f"outputs by {self.accuracy_level_steps:.3g} steps")
        return "\n".join(lines)


# ONNX's element types for the integer storage dtypes of quantized tensors.
ONNX_TYPES = {torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8, torch.int32: onnx.TensorProto.INT32}


def _signed_codes(q: torch.Tensor) -> torch.Tensor:
    """Each float8 value's position on the number line: its magnitude bits, negated for negatives."""
    code = q.view(torch.uint8).to(torch.int16)
    magnitude = code & 0x7F
    return torch.where(code >= 0x80, -magnitude, magnitude)


def _compare(name: str, kind: str, ours: torch.Tensor, theirs: torch.Tensor, unit: float, step: float) -> TensorCheck:
    """``ours`` against ``theirs`` in steps, where one step is ``unit`` in the tensors' own values."""
    if ours.dtype in FLOAT8:
        difference = (_signed_codes(ours) - _signed_codes(theirs)).abs()
    else:
        difference = (ours.double() - theirs.double()).abs()
    if difference.numel() == 0:
        return TensorCheck(name, kind, step, 0.0, 0.0)
    return TensorCheck(name, kind, step, float(difference.max()) / unit, float((difference > 0).double().mean()))


class _TeacherForced(fx.Interpreter):
    """Runs the Q/DQ graph with each quantize node's value replaced by ONNX Runtime's."""

    def __init__(self, gm: fx.GraphModule, forced: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.forced = forced
        self.checks: list[TensorCheck] = []

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name not in self.forced:
            return value
        theirs = self.forced[node.name]
        quantize = QuantizeCall.of(node)
        scale = constant_value(self.module, quantize.scale) if quantize is not None else None
        step = float(scale.max()) if scale is not None else float("nan")
        self.checks.append(_compare(node.name, "quantized", value, theirs, 1.0, step))
        return theirs


def _output_step(gm: fx.GraphModule, node: Any, value: torch.Tensor) -> float:
    dequantize = DequantizeCall.of(node)
    if dequantize is not None and dequantize.axis is None:
        return float(constant_value(gm, dequantize.scale))
    if not value.is_floating_point() or value.numel() == 0:
        return 1.0
    return max(float(value.max() - value.min()) / 255, torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class OptimizedGraph:
    """What ONNX Runtime made of a file: its op counts, and the dequantized weights its float
    convolutions and matrix products still read (the DequantizeLinear outputs, named as the
    Q/DQ graph's dequantize nodes)."""

    ops: dict[str, int]
    float_weight_reads: tuple[str, ...]

    @staticmethod
    def of(model: onnx.ModelProto) -> OptimizedGraph:
        dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        reads = tuple(node.input[1] for node in model.graph.node
                      if node.op_type in FLOAT_COMPUTE and len(node.input) > 1 and node.input[1] in dequantized)
        return OptimizedGraph(dict(Counter(node.op_type for node in model.graph.node)), reads)


def _run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], config: dict[str, str] | None = None
                     ) -> tuple[list[np.ndarray], OptimizedGraph]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the hardware-specific-model warning on saving the optimized graph
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graph = OptimizedGraph.of(onnx.load(str(optimized), load_external_data=False))
    return session.run(None, feeds), graph


def _as_torch(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """ONNX Runtime's array as a tensor of ``dtype`` (float8 comes back as float32 values, which
    convert back exactly: each is a float8 value)."""
    return torch.from_numpy(value).to(dtype)


def _placeholder_values(reference: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """``args``/``kwargs`` by the name of the placeholder of ``reference`` each one feeds."""
    placeholders = [n.name for n in reference.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, flat_inputs(reference, args, kwargs), strict=True))


def _feeds(model: onnx.ModelProto, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    # The file's inputs are the graph's placeholders in order; their names may differ (fx
    # renames a forward argument called ``input``, as nn.Sequential's is, to ``input_1``).
    if len(model.graph.input) != len(values):
        raise QCompileError(f"the ONNX file has {len(model.graph.input)} inputs, the Q/DQ graph {len(values)}")
    return {graph_input.name: value.detach().cpu().numpy() for graph_input, value in zip(model.graph.input, values.values())}


def onnx_feeds(model: onnx.ModelProto, reference: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """``args``/``kwargs`` as ONNX Runtime's feeds for ``model``, exported from ``reference``."""
    return _feeds(model, _placeholder_values(reference, args, kwargs))


def cross_check(model: onnx.ModelProto, reference: fx.GraphModule, args: tuple, kwargs: dict,
                tolerance_steps: float = 1.0, accuracy_levels: tuple[AccuracyLevel, ...] = ()) -> CrossCheck:
    """Compare ``model`` in ONNX Runtime with ``reference`` (the program it was exported from;
    its node names are the ONNX value names) on one input; see the module docstring. Its
    MatMulNBits nodes run at float activations; ``accuracy_levels`` are those the file is
    written with, whose effect on the outputs is reported."""
    quantize_nodes = {n.name: n for n in reference.graph.nodes if n.target == QUANTIZE}
    exposed = [node.output[0] for node in model.graph.node
               if node.op_type == "QuantizeLinear" and node.output[0] in quantize_nodes]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    set_accuracy_levels(probe, {level.node: FLOAT_ACTIVATIONS for level in accuracy_levels})
    for name in exposed:
        dtype = quantize_nodes[name].meta["val"].dtype
        if dtype in FLOAT8:  # ONNX Runtime has no numpy type for every float8: read it as its exact float32 values
            probe.graph.node.append(onnx.helper.make_node("Cast", [name], [f"{name}__float"], to=onnx.TensorProto.FLOAT))
            probe.graph.output.append(onnx.helper.make_tensor_value_info(f"{name}__float", onnx.TensorProto.FLOAT, None))
        else:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, ONNX_TYPES[dtype], None))
    values = _placeholder_values(reference, args, kwargs)
    feeds = _feeds(model, values)
    results, optimized = _run_onnxruntime(probe, feeds)
    ops = optimized.ops
    count = len(model.graph.output)
    forced = {name: _as_torch(value, quantize_nodes[name].meta["val"].dtype)
              for name, value in zip(exposed, results[count:], strict=True)}
    interpreter = _TeacherForced(reference, forced)
    with torch.no_grad():
        ours = torch.utils._pytree.tree_leaves(interpreter.run(*values.values()))
    checks = interpreter.checks
    output_nodes = torch.utils._pytree.tree_leaves(reference.graph.output_node().args[0])
    for graph_output, node, mine, theirs in zip(model.graph.output, output_nodes, ours, results[:count], strict=True):
        theirs = torch.from_numpy(theirs)
        step = _output_step(reference, node, mine)
        checks.append(_compare(graph_output.name, "output", mine, theirs, step, step))
    result = CrossCheck(checks, tolerance_steps, ops, float_weight_reads=optimized.float_weight_reads)
    if accuracy_levels:
        written = onnx.ModelProto()
        written.CopyFrom(model)
        set_accuracy_levels(written, {level.node: level.level for level in accuracy_levels})
        at_levels, _ = _run_onnxruntime(written, feeds)
        result.accuracy_levels = tuple(accuracy_levels)
        result.accuracy_level_steps = max(
            _compare("", "output", torch.from_numpy(a), torch.from_numpy(b), check.step, check.step).max_steps
            for a, b, check in zip(at_levels, results[:count], checks[-count:], strict=True))
    first = result.diverged
    if first is not None:
        raise QCompileError(
            f"ONNX Runtime and the Q/DQ graph diverge at {first.kind} tensor '{first.name}': "
            f"{first.max_steps:.3g} steps of {first.step:.3g} apart given the same integer inputs "
            f"(tolerance {tolerance_steps:g} steps; {first.mismatched:.1%} of its elements differ)"
        )
    return result
