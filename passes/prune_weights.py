"""prune-weights: magnitude pruning of the weights the plan quantizes, as a mask QAT keeps.

    linear(x, W, b)   ->   linear(x, mul(W, M), b)        M ∈ {0, 1}, a constant of W's shape

* ``unstructured``: M zeroes the ``sparsity`` fraction of W's entries smallest in magnitude
  (per tensor: layers with many small weights give more);
* ``2:4``: in every group of 4 consecutive weights along the reduction (input channels, and a
  convolution's window), M keeps the 2 largest in magnitude (the pattern sparse tensor cores run;
  50 %); a layer whose reduction is not a multiple of 4 is left dense and reported.

The weight stays a trainable parameter and the product is what the op reads, so in QAT the
optimizer updates W while ``mul`` keeps the pruned entries at zero and stops their gradient;
``insert-fake-quant`` fake-quantizes the product and ``lower-qat`` / ``convert`` store its integers,
zeros included. The saved model stores an int8 weight that is half zeros or more as its nonzero
values and a bitmask (:mod:`qcompile.artifact`). Runs after ``annotate``: only weights the plan
quantizes are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.errors import QCompileError
from qcompile.ir.graph import add_constant, constant_value, insert_call
from qcompile.ir.meta import Provenance, get_qspec
from qcompile.pipeline import Diagnostic, Pass, PassResult

aten = torch.ops.aten
PATTERNS = ("unstructured", "2:4")


def magnitude_mask(weight: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """The 0/1 mask of the module docstring, in ``weight``'s dtype."""
    magnitude = weight.detach().abs().float()
    if pattern == "unstructured":
        pruned = int(round(sparsity * magnitude.numel()))
        mask = torch.ones_like(magnitude)
        if pruned:
            mask.view(-1)[magnitude.reshape(-1).argsort()[:pruned]] = 0.0
        return mask.to(weight.dtype)
    # 2:4 along the reduction (input channels x kernel window, contiguous in W's layout): the 2
    # smallest of each 4 consecutive weights go.
    groups = magnitude.reshape(magnitude.shape[0], -1, 4)
    keep = torch.zeros_like(groups).scatter_(-1, groups.topk(2, dim=-1).indices, 1.0)
    return keep.reshape(weight.shape).to(weight.dtype)


@dataclass(frozen=True)
class PruneWeights(Pass):
    name: ClassVar[str] = "prune-weights"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    establishes: ClassVar[frozenset[str]] = frozenset({"pruned"})

    sparsity: float = 0.5
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise QCompileError(f"prune-weights pattern '{self.pattern}' is not one of: {', '.join(PATTERNS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise QCompileError(f"prune-weights sparsity is a fraction in [0, 1), got {self.sparsity}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        pruned, zeros, total, skipped = 0, 0, 0, []
        for node in list(gm.graph.nodes):
            plan = get_qspec(node)
            if plan is None or not plan.quantized or node.op != "call_function":
                continue
            for index, edge in plan.inputs:
                if edge.role != "weight" or node.target == aten.embedding.default:
                    continue  # an embedding table's rows are not pruned: a looked-up row is all there is
                weight = node.args[index]
                value = constant_value(gm, weight)
                if value is None or value.dim() < 2 or not value.is_floating_point():
                    continue
                if self.pattern == "2:4" and (value.numel() // value.shape[0]) % 4:
                    skipped.append(Diagnostic(node.name, "kept", f"2:4 pruning needs a reduction of a multiple of 4 "
                                                                 f"weights, {node.name} has {value.numel() // value.shape[0]}"))
                    continue
                mask = magnitude_mask(value, self.pattern, self.sparsity)
                mask_node = add_constant(gm, mask, f"{node.name}_prune_mask", before=node)
                product = insert_call(gm, aten.mul.Tensor, (weight, mask_node), before=node,
                                      provenance=Provenance(self.name, self.pattern, (weight.name,)))
                node.update_arg(index, product)
                pruned += 1
                zeros += int((mask == 0).sum())
                total += mask.numel()
        stats = {"weights": pruned, "sparsity": round(zeros / total, 4)} if pruned else {}
        return PassResult(gm, bool(pruned), stats, tuple(skipped))
