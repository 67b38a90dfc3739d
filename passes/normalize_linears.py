"""normalize-linears: a matrix product with a constant weight becomes ``linear``.

    addmm(b, x, W)    ->  linear(x, Wᵀ, b)     (beta = alpha = 1; GPT-2's Conv1D)
    mm(x, W)          ->  linear(x, Wᵀ)
    matmul(x, W)      ->  linear(x, Wᵀ)        (W 2-D; x of any rank)

with ``W`` a constant [in, out] and ``Wᵀ`` a new contiguous constant [out, in], because
``x @ W + b = linear(x, Wᵀ, b)`` exactly. Everything after capture that knows weight ops knows
``linear``: the op rules, outlier smoothing, sibling merging, the int8 kernels and the ONNX
exporter; a model that writes its projections as ``addmm`` (GPT-2's ``Conv1D``) or ``x @ W``
gets all of that without a second set of rules. Products of two activations (attention's
``q @ kᵀ``) have no constant operand and are left alone. The model's own tensor is never
changed; the transposed copy is the graph's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult

aten = torch.ops.aten
# op -> (its input argument, its weight argument, its bias argument or None)
PRODUCTS = {
    aten.addmm.default: ("mat1", "mat2", "self"),
    aten.mm.default: ("self", "mat2", None),
    aten.matmul.default: ("self", "other", None),
}


@dataclass(frozen=True)
class NormalizeLinears(Pass):
    name: ClassVar[str] = "normalize-linears"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewritten: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in PRODUCTS:
                continue
            x_arg, weight_arg, bias_arg = PRODUCTS[node.target]
            arguments = op_arguments(node)
            weight = constant_value(gm, arguments[weight_arg])
            if weight is None or weight.dim() != 2 or not weight.is_floating_point():
                continue
            if node.target == aten.addmm.default and (arguments["beta"] != 1 or arguments["alpha"] != 1):
                continue
            bias = arguments[bias_arg] if bias_arg else None
            bias_value = constant_value(gm, bias) if bias is not None else None
            if bias is not None and (bias_value is None or bias_value.shape != (weight.shape[1],)):
                continue  # a computed or broadcast bias: linear takes one constant per output
            transposed = add_constant(gm, weight.t().contiguous(), f"{node.name}_weight", before=node)
            kind = str(node.target).split(".")[1]
            linear = insert_call(gm, aten.linear.default, (arguments[x_arg], transposed, bias), before=node,
                                 provenance=Provenance(self.name, kind, (node.name,)), meta_from=node)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            rewritten[kind] = rewritten.get(kind, 0) + 1
        return PassResult(gm, bool(rewritten), rewritten)
