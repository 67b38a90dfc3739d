"""split-recurrent: a GRU / LSTM becomes a linear over the whole sequence and a recurrent kernel.

For each layer l and direction d (``idx = l·D + d``) of ``gru(x, h0, params, ...)``:

    Gx      = linear(x_l, W_ih[idx], b_ih[idx])                       [T, B, G·H] (or batch first)
    y_d, h_d = qc.gru_recurrence(Gx, h0[idx], W_hh[idx], b_hh[idx], reverse=(d = 1), batch_first)
    x_{l+1} = cat(y_0, y_1, -1)  (one direction: y_0)

    output = x_L,  h_n = stack(h_idx for every idx)                     (LSTM: also c0 in, c_n out)

A recurrent layer's input product x_t·W_ihᵀ reads no earlier step, so for every step at once it
is one GEMM of T·B rows: after this pass an ordinary ``linear``, which the plan quantizes and
cpu-int8 runs on its int8 kernels like any projection. What must wait for h_{t−1} (a product of
B rows a step, and the gates) runs in one native kernel (:mod:`.recurrence`) in fp32: per-step
int8 would quantize B rows and call a GEMM every step, which measures slower here than the
whole fused fp32 step. The algebra is PyTorch's own: ATen's CPU RNNs also compute the input
product for all steps first, so the rewrite changes only the summation order of the recurrent
product. Layers in training mode (dropout between them) and LSTMs with projections
(``proj_size``) are left to ATen, as float weight ops the report names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.ir.graph import constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.targets.cpu_int8.recurrence import gru_recurrence, lstm_recurrence

aten = torch.ops.aten
# op -> (its kind, its recurrent kernel, number of state tensors)
RECURRENT = {
    aten.gru.input: ("gru", gru_recurrence, 1),
    aten.lstm.input: ("lstm", lstm_recurrence, 2),
}


def _layout(rnn: dict[str, Any]) -> tuple[int, int]:
    """(directions, parameters per layer and direction) of an RNN call's arguments."""
    return 2 if rnn["bidirectional"] else 1, 4 if rnn["has_biases"] else 2


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
    rnn = op_arguments(node)
    directions, per_direction = _layout(rnn)
    if rnn["train"]:
        return "runs in training mode"
    if len(rnn["params"]) != rnn["num_layers"] * directions * per_direction:
        return "has extra parameters per layer (an LSTM projection)"
    if any(constant_value(gm, p) is None for p in rnn["params"]):
        return "has weights computed in the graph"
    return None


def _split(gm: fx.GraphModule, node: fx.Node, pass_name: str) -> None:
    kind, kernel, states = RECURRENT[node.target]
    rnn = op_arguments(node)
    directions, per_direction = _layout(rnn)
    initial = [rnn["hx"]] if states == 1 else list(rnn["hx"])
    provenance = Provenance(pass_name, kind, (node.name,))

    def call(target: Any, *args: Any, meta: bool = False) -> fx.Node:
        return insert_call(gm, target, args, before=node, provenance=provenance, meta_from=node if meta else None)

    layer_input, finals = rnn["input"], [[] for _ in range(states)]
    for layer in range(rnn["num_layers"]):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w_ih, w_hh, *biases = rnn["params"][index * per_direction:(index + 1) * per_direction]
            b_ih, b_hh = biases if biases else (None, None)
            gates_x = call(aten.linear.default, layer_input, w_ih, b_ih, meta=True)
            starts = [call(aten.select.int, state, 0, index) for state in initial]
            steps = call(kernel, gates_x, *starts, w_hh, b_hh, direction == 1, rnn["batch_first"], meta=True)
            outputs.append(call(operator.getitem, steps, 0))
            for s in range(states):
                finals[s].append(call(operator.getitem, steps, 1 + s))
        layer_input = outputs[0] if directions == 1 else call(aten.cat.default, outputs, -1)
    results = [layer_input, *(call(aten.stack.default, f, 0) for f in finals)]
    for user in list(node.users):
        if user.op == "call_function" and user.target == operator.getitem:
            user.replace_all_uses_with(results[user.args[1]])
            gm.graph.erase_node(user)
    if not node.users:
        gm.graph.erase_node(node)


@dataclass(frozen=True)
class SplitRecurrent(Pass):
    name: ClassVar[str] = "split-recurrent"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        split: dict[str, int] = {}
        kept: list[Diagnostic] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in RECURRENT:
                continue
            kind = RECURRENT[node.target][0]
            reason = _why_not(gm, node)
            if reason is not None:
                kept.append(Diagnostic(node.name, "kept", f"the {kind} {reason}: it runs as ATen's float {kind}"))
                continue
            _split(gm, node, self.name)
            split[kind] = split.get(kind, 0) + 1
        return PassResult(gm, bool(split), split, tuple(kept))
