"""Blocked 4-bit weights written as ONNX Runtime's ``MatMulNBits``, each with its own ``accuracy_level``.

The export writes a per-group weight as ``MatMul(x, DequantizeLinear(W_q INT4 [K, N], S, Z,
axis=0, block_size=B))``, which ONNX Runtime fuses into ``com.microsoft.MatMulNBits``, and that
kernel's accuracy comes from one session option for the whole model: at its default (level 4)
it quantizes every activation block to int8, which the file does not say and which flips greedy
tokens on outlier-heavy models. So the export writes the fused node itself:

    MatMul(x, DequantizeLinear(W_q, S, Z, axis=0, block_size=B))
        ->  MatMulNBits(x, B_packed, S', Z_packed; K, N, bits=4, block_size=B, accuracy_level=L)

``B_packed`` is [N, K/B, B/2] bytes: for output n and block b, byte j holds u = q + 8 of inputs
bB + 2j (low nibble) and bB + 2j + 1 (high nibble); ``S'`` is S transposed to [N, K/B]; ``Z``
(affine blocks only) is Z + 8 packed the same way along the blocks, and symmetric blocks omit it
(MatMulNBits' default zero point is 8). So (u − (Z + 8))·S = (q − Z)·S: the same weight, bit for
bit (tested through ONNX Runtime).

``L`` is chosen per node by measurement (:func:`choose_accuracy_levels`). The node runs alone on
its own float-activation input x (so no upstream change is charged to it) at level 1 and at
level 4; the difference is the noise int8 activations add. It is compared with the noise the
4-bit weights already put on the same output, estimated as uniform rounding noise, S²/12 per
weight (RTN's error; GPTQ's output error is lower, so the test is lenient there):

    weight noise = Σ_m Σ_n Σ_b (Σ_{k in block b} x[m, k]²) · S[b, n]² / 12

Level 4 is written where the activations' noise is at most
:data:`INT8_ACTIVATION_MAX_NOISE_RATIO` of that, level 1 (float activations, the Q/DQ graph's
arithmetic) elsewhere. A ratio bound rather than a fixed SQNR, because what int8 activations
cost depends on the error the node already has: per block, their noise over the weights' is about
(crest_x / crest_w)² · (7 / 127)², where crest = max / RMS of the block: small (0.3 % for Gaussian
activations and weights, 1 % into nn.Linear's uniform initial weights) unless a block's activations
are dominated by a few outlier channels, the case ONNX Runtime's default gets wrong (one channel
100x the rest of a block of 128, crest √128: 13 % into uniform weights).
A user may also fix one level for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qcompile.errors import QCompileError

MICROSOFT = "com.microsoft"
FLOAT_ACTIVATIONS, INT8_ACTIVATIONS = 1, 4  # MatMulNBits accuracy levels: fp32 inputs, int8 per block
# int8 activations may add at most 2 % to the noise power the 4-bit weights already put on the
# node's output: its SQNR drops by at most 0.09 dB.
INT8_ACTIVATION_MAX_NOISE_RATIO = 0.02


@dataclass(frozen=True)
class AccuracyLevel:
    """One MatMulNBits node's level and, when measured, its int8-activation output's SQNR against
    the float-activation output and that noise over the weights' estimated rounding noise."""

    node: str
    level: int
    sqnr_db: float | None = None
    noise_ratio: float | None = None


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Values in [0, 16) along the last axis (even length), two a byte, the first in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def write_matmul_nbits(model: onnx.ModelProto) -> list[str]:
    """Rewrite every MatMul of a constant INT4 blocked DequantizeLinear (axis 0) into a
    MatMulNBits at :data:`FLOAT_ACTIVATIONS` (the module doc's layout); returns the new nodes' names."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    written, dropped = [], []
    for dq in list(model.graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        weight = initializers[dq.input[0]]
        users = readers.get(dq.output[0], [])
        if (weight.data_type != onnx.TensorProto.INT4 or attributes.get("axis") != 0 or "block_size" not in attributes
                or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0]):
            continue
        matmul, block = users[0], int(attributes["block_size"])
        q = onnx.numpy_helper.to_array(weight).astype(np.int16)  # [K, N]
        depth, outputs = q.shape
        if depth % block or block % 2:
            raise QCompileError(f"MatMulNBits: weight '{dq.input[0]}' has {depth} rows, not whole blocks of {block}")
        blocks = depth // block
        packed = _pack_nibbles((q.T + 8).reshape(outputs, blocks, block))
        scale = onnx.numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32).T  # [N, K/B]
        name = matmul.name or f"{matmul.output[0]}_nbits"
        tensors = [onnx.numpy_helper.from_array(packed, f"{name}_B"),
                   onnx.numpy_helper.from_array(np.ascontiguousarray(scale), f"{name}_scales")]
        inputs = [matmul.input[0], tensors[0].name, tensors[1].name]
        if len(dq.input) > 2 and dq.input[2]:
            zero = onnx.numpy_helper.to_array(initializers[dq.input[2]]).astype(np.int16).T + 8  # [N, K/B]
            zero = np.pad(zero, ((0, 0), (0, zero.shape[1] % 2)))  # whole bytes: an odd count's last nibble is read by no block
            tensors.append(onnx.numpy_helper.from_array(_pack_nibbles(zero), f"{name}_zero_points"))
            inputs.append(tensors[-1].name)
        model.graph.initializer.extend(tensors)
        index = list(model.graph.node).index(matmul)
        model.graph.node.insert(index, onnx.helper.make_node(
            "MatMulNBits", inputs, list(matmul.output), name=name, domain=MICROSOFT, K=depth, N=outputs, bits=4,
            block_size=block, accuracy_level=FLOAT_ACTIVATIONS))
        dropped += [dq, matmul]
        written.append(name)
    for node in dropped:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)
    if written and not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MICROSOFT, 1))
    return written


def set_accuracy_levels(model: onnx.ModelProto, levels: dict[str, int]) -> None:
    """Write each named MatMulNBits node's ``accuracy_level``."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name in levels:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = levels[node.name]


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _alone(model: onnx.ModelProto, node: onnx.NodeProto, level: int) -> onnx.ModelProto:
    """``node`` as a model of its own (its initializers copied), at ``level``."""
    initializers = {t.name: t for t in model.graph.initializer}
    single = onnx.helper.make_node(node.op_type, list(node.input), ["y"], domain=node.domain,
                                   **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    next(a for a in single.attribute if a.name == "accuracy_level").i = level
    graph = onnx.helper.make_graph(
        [single], "alone", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [initializers[name] for name in node.input[1:] if name in initializers])
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def weight_rounding_noise(model: onnx.ModelProto, node: onnx.NodeProto, x: np.ndarray) -> float:
    """The noise power the node's blocked 4-bit weights put on its output for input ``x``,
    estimated as uniform rounding noise (the module doc's formula)."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    depth, block = int(attributes["K"]), int(attributes["block_size"])
    scale = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[2]))
    rows = np.square(x.reshape(-1, depth).astype(np.float64))
    power = rows.reshape(rows.shape[0], depth // block, block).sum(-1)  # [M, K/B]: Σ x² per block (whole blocks)
    return float((power @ np.square(scale.astype(np.float64)).T).sum() / 12)


def choose_accuracy_levels(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                           max_noise_ratio: float = INT8_ACTIVATION_MAX_NOISE_RATIO) -> list[AccuracyLevel]:
    """Each MatMulNBits node's level, measured on ``feeds`` (the module doc): the model runs at
    float activations with every such node's input and output exposed; each node then runs alone
    at level 4 on its own input, and keeps level 4 where the noise that adds is at most
    ``max_noise_ratio`` of the weights' rounding noise (:func:`weight_rounding_noise`)."""
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    set_accuracy_levels(probe, {n.name: FLOAT_ACTIVATIONS for n in nodes})
    graph_outputs = {o.name for o in probe.graph.output}
    exposed = list(dict.fromkeys(name for n in nodes for name in (n.input[0], n.output[0]) if name not in graph_outputs))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in exposed)
    names = [o.name for o in probe.graph.output]
    values = dict(zip(names, _session(probe).run(None, feeds), strict=True))
    chosen = []
    for node in nodes:
        x, y = values[node.input[0]], values[node.output[0]].astype(np.float64)
        quantized = _session(_alone(model, node, INT8_ACTIVATIONS)).run(None, {node.input[0]: x})[0]
        noise = float(np.square(quantized.astype(np.float64) - y).sum())
        sqnr = float("inf") if noise == 0 else 10 * np.log10(max(float(np.square(y).sum()), 1e-300) / noise)
        ratio = noise / max(weight_rounding_noise(model, node, x), 1e-300)
        level = INT8_ACTIVATIONS if ratio <= max_noise_ratio else FLOAT_ACTIVATIONS
        chosen.append(AccuracyLevel(node.name, level, sqnr, ratio))
    return chosen
