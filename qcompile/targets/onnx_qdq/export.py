"""ONNX QDQ export: the Q/DQ graph written as QuantizeLinear / DequantizeLinear (opset 21).

    qm.export_onnx("model.int8.onnx")      # or qcompile.export_onnx(qdq_graph_module, path, args)

The Q/DQ form maps 1:1 to ONNX: ``qc.quantize(x, S, Z, axis)`` is ``QuantizeLinear(x, S, Z)``
and ``qc.dequantize`` is ``DequantizeLinear``, with the zero point stored in the integer type
ONNX requires (the graph keeps it as int32). Everything else goes through torch.onnx's own
ATen translations. Weights stay int8 initializers feeding DequantizeLinear (ONNX Runtime
does not constant-fold DequantizeLinear), so the file is about a quarter of the fp32 one and
ONNX Runtime's QDQ optimizer fuses ``DQ -> MatMul`` into MatMulIntegerToFloat and
``DQ -> Conv -> Q`` into QLinearConv. The graph written is a copy arranged for ONNX Runtime's
CPU optimizer, with the same values: float bias constants for batched linears, and residual
adds into a LayerNorm as ``Sum`` (``_for_onnx_runtime``).

Dynamic quantization's ``qc.choose_qparams`` (uint8, affine) is ``DynamicQuantizeLinear``'s
scale and zero point, the same formula. A graph that cannot be exported fails before anything
is written, naming the node: observers left in it (never calibrated), an op without an ONNX
translation (the lowered kernels, per-token scales, a user's custom op), or an integer range
ONNX cannot express (narrow ranges, int4 in int8 storage). After writing, the file is checked with
``onnx.checker`` (full check) and cross-checked in ONNX Runtime (:mod:`qcompile.targets.onnx_qdq.check`).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op
from torch import fx

from qcompile.capture import export_program
from qcompile.ir.graph import constant_value, op_arguments
from qcompile.ir.meta import source_module
from qcompile.errors import NodeError, QCompileError
from qcompile.observers import Observer
from qcompile.pass_manager import PassManager
from qcompile.qdq import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, DequantizeCall, QuantizeCall
from qcompile.spec import FLOAT8_STORAGE
from qcompile.targets.onnx_qdq.arrange import ARRANGE_FOR_ONNX_RUNTIME, DEQUANTIZE_BLOCKED, UNFUSED_SUM
from qcompile.targets.onnx_qdq.check import CrossCheck, cross_check, onnx_feeds
from qcompile.targets.onnx_qdq.matmul_nbits import (
    FLOAT_ACTIVATIONS,
    INT8_ACTIVATIONS,
    AccuracyLevel,
    choose_accuracy_levels,
    set_accuracy_levels,
    write_matmul_nbits,
)

OPSET = 21  # 19 added float8 QuantizeLinear/DequantizeLinear; 21 blocked scales
# The full range of each integer storage type: ONNX's QuantizeLinear saturates to exactly these.
_FULL_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1),
                torch.float8_e4m3fn: (-448, 448), torch.float8_e5m2: (-57344, 57344)}


def _per_tensor_scale(scale):
    """ONNX wants a per-tensor scale as a scalar; one-element tensors are reshaped (and folded)."""
    if scale.shape is not None and len(scale.shape) == 0:
        return scale
    return op.Squeeze(scale)


def _quantize_linear(x, scale, zero_point, axis: int | None, qmin: int, qmax: int, dtype):
    zero_point = op.Cast(zero_point, to=dtype)
    if axis is None:
        return op.QuantizeLinear(x, _per_tensor_scale(scale), op.Squeeze(zero_point))
    return op.QuantizeLinear(x, scale, zero_point, axis=axis)


def _dequantize_linear(q, scale, zero_point, axis: int | None, out_dtype):
    zero_point = op.CastLike(zero_point, q)
    if axis is None:
        return op.DequantizeLinear(q, _per_tensor_scale(scale), op.Squeeze(zero_point))
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _sum(values):
    return op.Sum(*values)


def _choose_qparams(x, qmin: int, qmax: int, symmetric: bool):
    """Dynamic quantization's scale and zero point as ONNX's DynamicQuantizeLinear computes them:
    S = (max(x, 0) − min(x, 0)) / 255, Z = round(−min(x, 0) / S), the affine uint8 formula
    ``qc.choose_qparams`` uses (checked before export: only that range is translated)."""
    _, scale, zero_point = op.DynamicQuantizeLinear(x)
    shape = op.Constant(value_ints=[1])
    return op.Reshape(scale, shape), op.Reshape(op.Cast(zero_point, to=onnx.TensorProto.INT32), shape)


def _dequantize_blocked(q, scale, zero_point, block_size: int, bits: int):
    """Blocked DequantizeLinear along axis 0 (opset 21). The integers are cast to INT4 / INT8
    here and the casts of constants folded into initializers after export
    (:func:`_fold_integer_casts`): ONNX Runtime fuses the DequantizeLinear only when its input
    is a constant."""
    dtype = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    return op.DequantizeLinear(op.Cast(q, to=dtype), scale, op.Cast(zero_point, to=dtype), axis=0,
                               block_size=block_size)


# PyTorch's gate blocks in ONNX's order: GRU r, z, n -> z, r, h; LSTM i, f, g, o -> i, o, f, c.
_ONNX_GATE_ORDER = {3: (1, 0, 2), 4: (0, 3, 1, 2)}


def _recurrent(onnx_op, gates_x, states, w_hh, b_hh, reverse: bool, batch_first: bool, **attributes):
    """``qc.gru_recurrence`` / ``qc.lstm_recurrence`` as ONNX's GRU / LSTM, exactly: the input
    gates Gx go in as X with W the identity in ONNX's gate order (X·Wᵀ = Gx, each output one
    product by 1), R = W_hh's gate blocks reordered, B = [0, b_hh reordered]; time-major inside
    (ONNX Runtime's CPU RNNs take layout 0). The identity is made in the graph (EyeLike), which
    ONNX Runtime folds when it loads the file, so the file does not hold it."""
    gates, hidden = w_hh.shape[0] // w_hh.shape[1], w_hh.shape[1]
    rows = np.concatenate([np.arange(g * hidden, (g + 1) * hidden) for g in _ONNX_GATE_ORDER[gates]])
    order = op.Constant(value=onnx.numpy_helper.from_array(rows.astype(np.int64)))
    square = op.ConstantOfShape(op.Constant(value_ints=[gates * hidden, gates * hidden]))
    selection = op.Unsqueeze(op.Gather(op.EyeLike(square), order, axis=0), [0])
    recurrent = op.Unsqueeze(op.Gather(w_hh, order, axis=0), [0])
    zeros = op.Constant(value=onnx.numpy_helper.from_array(np.zeros(gates * hidden, dtype=np.float32)))
    bias = op.Unsqueeze(op.Concat(zeros, zeros if b_hh is None else op.Gather(b_hh, order, axis=0), axis=0), [0])
    x = op.Transpose(gates_x, perm=[1, 0, 2]) if batch_first else gates_x
    outputs = onnx_op(x, selection, recurrent, bias, None,
                      *(op.Unsqueeze(state, [0]) for state in states), hidden_size=hidden,
                      direction="reverse" if reverse else "forward", **attributes)
    y = op.Squeeze(outputs[0], [1])  # [steps, 1 direction, batch, hidden]
    return (op.Transpose(y, perm=[1, 0, 2]) if batch_first else y, *(op.Squeeze(s, [0]) for s in outputs[1:]))


def _gru_recurrence(gates_x, h0, w_hh, b_hh, reverse: bool, batch_first: bool):
    return _recurrent(lambda *a, **k: op.GRU(*a, **k, linear_before_reset=1), gates_x, (h0,), w_hh, b_hh,
                      reverse, batch_first)


def _lstm_recurrence(gates_x, h0, c0, w_hh, b_hh, reverse: bool, batch_first: bool):
    return _recurrent(lambda x, w, r, b, lens, h, c, **k: op.LSTM(x, w, r, b, lens, h, c, **k), gates_x, (h0, c0),
                      w_hh, b_hh, reverse, batch_first)


TRANSLATIONS = {QUANTIZE: _quantize_linear, DEQUANTIZE: _dequantize_linear, UNFUSED_SUM: _sum,
                CHOOSE_QPARAMS: _choose_qparams, DEQUANTIZE_BLOCKED: _dequantize_blocked,
                torch.ops.qc.gru_recurrence.default: _gru_recurrence,
                torch.ops.qc.lstm_recurrence.default: _lstm_recurrence}


def _fold_integer_casts(model: onnx.ModelProto) -> int:
    """Each ``Cast`` of an initializer to INT4 / INT8 replaced by an initializer of that type
    (exact: the values were checked to fit when the graph was arranged); returns how many."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    folded = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if to not in (onnx.TensorProto.INT4, onnx.TensorProto.INT8) or node.input[0] not in initializers:
            continue
        values = onnx.numpy_helper.to_array(initializers[node.input[0]])
        model.graph.initializer.append(onnx.helper.make_tensor(node.output[0], to, values.shape,
                                                               values.astype(np.int8).flatten().tolist()))
        folded.append(node)
        if readers[node.input[0]] == 1:
            model.graph.initializer.remove(initializers[node.input[0]])
    for node in folded:
        model.graph.node.remove(node)
    return len(folded)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how it compares with the Q/DQ graph in torch."""

    path: Path
    bytes: int
    float_bytes: int
    check: CrossCheck | None
    quantized_weight_ops: int = 0  # linears and convolutions the Q/DQ graph reads int8 weights for
    float8_weight_ops: int = 0  # and those it reads float8 weights for
    # The quantized weight ops ONNX Runtime runs in float: node name and user module.
    unfused_ops: tuple[str, ...] = ()

    @property
    def float8_note(self) -> str | None:
        """What ONNX Runtime's CPU provider does with float8 Q/DQ, when the file has any."""
        if not self.float8_weight_ops:
            return None
        return (f"{self.float8_weight_ops} linears and convolutions read FP8 weights: ONNX Runtime's CPU provider runs "
                "FP8 QuantizeLinear/DequantizeLinear unfused (float compute on dequantized values, slower than the fp32 "
                "file); FP8 QDQ is a format for GPU runtimes such as TensorRT")

    @property
    def unfused(self) -> str | None:
        """What ONNX Runtime runs in float although the Q/DQ graph quantizes it, named, or None."""
        if self.check is None or self.check.int8_weight_kernels >= self.quantized_weight_ops:
            return None
        missing = self.quantized_weight_ops - self.check.int8_weight_kernels
        named = f": {', '.join(self.unfused_ops)}" if self.unfused_ops else ""
        return (f"ONNX Runtime fused {self.check.int8_weight_kernels} of the {self.quantized_weight_ops} quantized "
                f"convolutions and linears into int8 kernels; {missing} run in float on dequantized weights "
                f"(a Q/DQ pattern its optimizer does not fuse){named}")

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.bytes / 1e6:.1f} MB, {self.bytes / self.float_bytes:.0%} of the "
                 f"{self.float_bytes / 1e6:.1f} MB of float weights)"]
        if self.check is not None:
            lines.append(str(self.check))
        lines += [note for note in (self.unfused, self.float8_note) if note]
        return "\n".join(lines)


WEIGHT_OPS = frozenset({torch.ops.aten.linear.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                        torch.ops.aten.conv3d.default})


def quantized_weight_ops(gm: fx.GraphModule, float8: bool = False) -> int:
    """Linears and convolutions whose weight comes from a dequantize of integers (what ORT should
    run in int8), or with ``float8`` of float8 values (what ORT's CPU provider runs unfused)."""
    count = 0
    for node in gm.graph.nodes:
        dq = DequantizeCall.of(op_arguments(node)["weight"]) if node.target in WEIGHT_OPS else None
        if dq is not None and (dq.integer_dtype in FLOAT8_STORAGE) == float8:
            count += 1
    return count


def unfused_weight_ops(reference: fx.GraphModule, check: CrossCheck | None) -> tuple[str, ...]:
    """The weight ops of ``reference`` (the exported program) whose dequantized weight ONNX
    Runtime's float Conv/MatMul/Gemm read, as ``node (module Class)``."""
    if check is None:
        return ()
    nodes = {node.name: node for node in reference.graph.nodes}
    named = []
    for read in dict.fromkeys(check.float_weight_reads):
        for user in (nodes[read].users if read in nodes else ()):
            if user.op != "call_function" or user.target not in (*WEIGHT_OPS, torch.ops.aten.matmul.default):
                continue
            module = source_module(user)
            named.append(f"{user.name} ({module[0]} {module[1]})" if module else user.name)
    return tuple(named)


def _check_exportable(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Observer):
            raise NodeError(node, "the graph still has observers: it was never calibrated and converted to "
                                  "the Q/DQ form (export the result of qcompile.compile, or run calibrate and convert)")
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        namespace = node.target.namespace
        if namespace not in ("aten", "prims") and node.target not in TRANSLATIONS:
            hint = (" (per-token scales: ONNX quantizes dynamically per tensor only; plan per-tensor activations)"
                    if node.target.name().startswith("qc::choose_qparams_per_token") else "")
            raise NodeError(node, f"op {node.target.name()} has no ONNX translation{hint}")
        if node.target == CHOOSE_QPARAMS and tuple(node.args[1:]) != (0, 255, False):
            raise NodeError(node, f"dynamic quantization to [{node.args[1]}, {node.args[2]}]"
                                  f"{' symmetric' if node.args[3] else ''}: ONNX's DynamicQuantizeLinear computes uint8 "
                                  "affine scales only")
        call = QuantizeCall.of(node) or DequantizeCall.of(node)
        if call is not None and call.axis is None and not call.per_tensor:
            raise NodeError(node, "scales per row (a [..., 1] scale tensor) are not exported: ONNX quantizes "
                                  "per tensor, per axis or in blocks of a constant (per-group linear weights)")
        quantize = QuantizeCall.of(node)
        if quantize is not None and _FULL_RANGES.get(quantize.dtype) != (quantize.qmin, quantize.qmax):
            raise NodeError(node, f"quantize to {quantize.dtype} with range [{quantize.qmin}, {quantize.qmax}]: ONNX "
                                  "QuantizeLinear saturates to the full range of its type, so this range cannot be "
                                  "exported")


def _writable(path: Path) -> None:
    """Fail before the export's seconds of work, and without creating anything."""
    if path.is_dir():
        reason = "it is a folder"
    elif not path.parent.is_dir():
        reason = f"the folder '{path.parent}' does not exist"
    elif not os.access(path if path.exists() else path.parent, os.W_OK):
        reason = "permission denied"
    else:
        return
    raise QCompileError(f"cannot write the ONNX file '{path}': {reason}")


def _float_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the graph's constants were each element float32: the weights of the fp32 file."""
    constants = {node.target: constant_value(gm, node) for node in gm.graph.nodes if node.op == "get_attr"}
    return sum(t.numel() * 4 for t in constants.values() if isinstance(t, torch.Tensor))


def _for_onnx_runtime(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the same values, arranged for ONNX Runtime's CPU graph optimizer by the passes
    of :mod:`.arrange`, run (dumped, verified, skippable) like every other pipeline."""
    return PassManager(ARRANGE_FOR_ONNX_RUNTIME, initial_properties={"qdq"})(gm).graph_module


def to_onnx(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[onnx.ModelProto, fx.GraphModule]:
    """The Q/DQ graph as an ONNX model (batch dimension dynamic), nothing written or checked; and
    the re-exported graph it was translated from, whose node names are the model's value names."""
    arranged = _for_onnx_runtime(gm)
    _check_exportable(arranged)
    program = export_program(arranged, args, kwargs)
    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR  # per-op registry chatter about torchvision
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exported = torch.onnx.export(program, dynamo=True, opset_version=OPSET, custom_translation_table=TRANSLATIONS,
                                         optimize=True, verbose=False)
    except Exception as exc:  # the exporter wraps everything in its own types; keep its node line
        lines = [line for line in str(exc).splitlines() if "Error when translating node" in line]
        raise QCompileError(f"torch.onnx could not translate the Q/DQ graph: {lines[0] if lines else exc}") from exc
    finally:
        quiet.level = level
    model = exported.model_proto
    _fold_integer_casts(model)
    write_matmul_nbits(model)
    return model, program.module()


def export_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    check: bool = True,
    tolerance_steps: float = 1.0,
    accuracy_level: int | str = "auto",
) -> OnnxExport:
    """Write ``gm`` (a Q/DQ graph) to ``path`` as ONNX QDQ, checked and cross-checked in ONNX Runtime.

    The cross-check runs the file on ``args``/``kwargs`` and compares every quantized tensor
    and every output with ``gm`` in torch, in units of that tensor's quantization step; a
    difference above ``tolerance_steps`` raises an error naming the first tensor that diverged.
    Blocked 4-bit weights are written as ``MatMulNBits`` nodes whose ``accuracy_level`` is
    ``accuracy_level`` (1: float activations, 4: int8 per block) or, with "auto", chosen per
    node on ``args`` (:func:`~.matmul_nbits.choose_accuracy_levels`).
    """
    if accuracy_level not in ("auto", FLOAT_ACTIVATIONS, INT8_ACTIVATIONS):
        raise QCompileError(f"export_onnx: accuracy_level is 'auto', {FLOAT_ACTIVATIONS} (float activations) or "
                            f"{INT8_ACTIVATIONS} (int8 activations), not {accuracy_level!r}")
    path = Path(path)
    kwargs = dict(kwargs or {})
    _writable(path)
    model, reference = to_onnx(gm, tuple(args), kwargs)
    if accuracy_level == "auto":
        levels = choose_accuracy_levels(model, onnx_feeds(model, reference, tuple(args), kwargs))
    else:
        levels = [AccuracyLevel(n.name, int(accuracy_level)) for n in model.graph.node if n.op_type == "MatMulNBits"]
    # Written next to ``path`` and moved into place only once it passes both checks: a failed
    # export leaves no file behind, and never replaces a good one.
    partial = path.with_name(path.name + ".partial")
    try:
        set_accuracy_levels(model, {level.node: level.level for level in levels})
        onnx.save(model, partial)
        try:
            onnx.checker.check_model(str(partial), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise QCompileError(f"the exported file '{path}' fails onnx.checker: {exc}") from exc
        result = cross_check(model, reference, tuple(args), kwargs, tolerance_steps, tuple(levels)) if check else None
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    exported = OnnxExport(path, path.stat().st_size, _float_bytes(gm), result, quantized_weight_ops(gm),
                          quantized_weight_ops(gm, float8=True), unfused_weight_ops(reference, result))
    if exported.unfused:
        warnings.warn(exported.unfused, stacklevel=3)
    return exported
