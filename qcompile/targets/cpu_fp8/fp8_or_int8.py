"""fp8-or-int8: on a CPU without an FP8 GEMM, plan a W8A8 FP8 linear as INT8 where INT8 is at
least as faithful, since there the INT8 kernel is the fast one.

Without AMX an FP8 activation must be decoded before a bf16 GEMM reads it (a MiniLM call spends
a third more time than bf16 doing so), while oneDNN's u8s8 GEMM runs at about twice bf16's
speed. Which format is more faithful depends on the value: INT8's uniform grid wins on
well-behaved activations, FP8's relative steps on outlier-heavy ones (FFN down-projections).
So for every group of linears that read one observed value, on the compile's example inputs:

    y = linear(x, W, b)                      (float, the rows of the example)
    SQNR_fp8  = SQNR(y, linear(q_fp8(x), q_fp8(W), b))       the plan as given
    SQNR_int8 = SQNR(y, linear(q_u8(x),  q_i8(W),  b))       uint8 from the same observed range,
                                                             int8 per output channel (int7 on a CPU without VNNI)

and the group is planned as INT8 when SQNR_int8 ≥ SQNR_fp8 − ``tolerance_db`` at every reader.
Its observer becomes a uint8 observer holding the same range (nothing is calibrated twice), its
readers' plans take the INT8 specs, and cpu-fp8's lowering runs them on the int8 kernels. The
diagnostics give both SQNRs per linear. On a CPU with an FP8 GEMM the pass changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx
from torch.nn import functional as F

from qcompile.ir.graph import add_submodule, constant_expression, constant_value
from qcompile.ir.meta import EdgeQuant, QuantAnnotation, get_qspec, set_qspec
from qcompile.observers import MinMaxObserver, Observer, make_observer
from qcompile.ops import quantize_with
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qconfig import INT8_ACTIVATION
from qcompile.report import node_outputs, sqnr_db
from qcompile.spec import PerTensor, QuantSpec, compute_qparams
from qcompile.targets.cpu_features import has_fp8_gemm
from qcompile.targets.cpu_int8.capabilities import KERNEL_WEIGHT

if TYPE_CHECKING:
    from qcompile.context import CompileContext

LINEAR = torch.ops.aten.linear.default
SAMPLE_ROWS = 1024  # rows of each linear's input compared: enough for an SQNR to 0.1 dB


def _fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    q = quantize_with(x, scale, zero_point, spec)
    return torch.ops.qc.dequantize(q, scale, zero_point, spec.axis, torch.float32)


def _weight_fake_quantized(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    observer = make_observer(spec)
    observer(weight)
    return _fake_quantize(weight, spec, *observer.qparams())


@dataclass(frozen=True)
class Fp8OrInt8(Pass):
    name: ClassVar[str] = "fp8-or-int8"
    requires: ClassVar[frozenset[str]] = frozenset({"calibrated"})
    decides_plan: ClassVar[bool] = True

    # How much lower INT8's SQNR may be than FP8's and still be chosen (dB).
    tolerance_db: float = 0.0
    # Decide even where the CPU has an FP8 GEMM (tests; a study).
    always: bool = False
    # (linear, SQNR in FP8, SQNR in INT8) as run() measured them on the compile's example inputs;
    # the pass applies what they say, so its result is a function of its options and its graph.
    scores: tuple[tuple[str, float, float], ...] = ()

    def _skipped(self) -> bool:
        return has_fp8_gemm() and not self.always

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        """Measure both formats at every candidate linear on the example inputs, then decide."""
        if context is None or self.scores or self._skipped():
            return self(gm)
        groups = self._groups(gm)
        readers = [node for nodes in groups.values() for node in nodes]
        if not readers:
            return self(gm)
        args, kwargs = context.example
        inputs = node_outputs(gm, {n.args[0].name for n in readers}, args, kwargs,
                              keep=lambda x: x.reshape(-1, x.shape[-1])[:SAMPLE_ROWS].float().clone())
        with torch.no_grad():
            scores = self._measure(gm, groups, inputs)
        return replace(self, scores=tuple(scores))(gm)

    @classmethod
    def _measure(cls, gm: fx.GraphModule, groups: dict[fx.Node, list[fx.Node]],
                 inputs: dict[str, torch.Tensor]) -> list[tuple[str, float, float]]:
        scores = []
        for observer_node, nodes in groups.items():
            observer = gm.get_submodule(observer_node.target)
            for node in nodes:
                fp8, int8 = cls._scores(gm, node, inputs[node.args[0].name], observer)
                scores.append((node.name, round(fp8, 2), round(int8, 2)))
        return scores

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self._skipped():
            return PassResult(gm, False, {"skipped": "this CPU has an FP8 GEMM"})
        measured = {name: (fp8, int8) for name, fp8, int8 in self.scores}
        switched, kept, diagnostics = 0, 0, []
        for observer_node, readers in self._groups(gm).items():
            if not all(node.name in measured for node in readers):
                continue
            to_int8 = all(measured[n.name][1] >= measured[n.name][0] - self.tolerance_db for n in readers)
            for node in readers:
                fp8, int8 = measured[node.name]
                diagnostics.append(Diagnostic(node.name, "format", f"{'int8' if to_int8 else 'fp8'}: SQNR {int8:.1f} dB "
                                                                   f"in INT8, {fp8:.1f} dB in FP8 on the example inputs"))
            if to_int8:
                self._plan_int8(gm, observer_node, gm.get_submodule(observer_node.target), readers)
                switched += len(readers)
            else:
                kept += len(readers)
        stats = {"int8": switched, "fp8": kept} if switched or kept else {}
        return PassResult(gm, bool(switched), stats, tuple(diagnostics))

    @staticmethod
    def _groups(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
        """The observers of static per-tensor FP8 activations, each with the W8A8 FP8 linears reading it."""
        observers = {n.args[0].name: n for n in gm.graph.nodes
                     if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)}
        groups: dict[fx.Node, list[fx.Node]] = {}
        readers: dict[str, int] = {}  # every planned reader of each observed value
        for node in gm.graph.nodes:
            plan = get_qspec(node)
            if plan is None or not plan.quantized:
                continue
            edges = dict(plan.inputs)
            for edge in edges.values():
                if edge.role == "activation":
                    readers[edge.observe_at] = readers.get(edge.observe_at, 0) + 1
            activation, weight = edges.get(0), edges.get(1)
            if (node.target != LINEAR or activation is None or weight is None or not activation.spec.is_float8
                    or not weight.spec.is_float8 or not isinstance(activation.spec.granularity, PerTensor)
                    or activation.observe_at not in observers):
                continue
            groups.setdefault(observers[activation.observe_at], []).append(node)
        # A value that another planned node reads (in FP8, or as another op) keeps its FP8 observer.
        return {observer: nodes for observer, nodes in groups.items() if readers[observer.args[0].name] == len(nodes)}

    @staticmethod
    def _scores(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, observer: Observer) -> tuple[float, float]:
        """(SQNR in FP8, SQNR in INT8) of ``node``'s output on the sampled rows ``x``."""
        plan = dict(get_qspec(node).inputs)
        weight = constant_expression(gm, node.args[1]).float()
        bias = constant_value(gm, node.args[2]) if len(node.args) > 2 else None
        y = F.linear(x, weight, bias)
        lo, hi = observer.range()
        results = []
        for activation, weight_spec in ((plan[0].spec, plan[1].spec), (INT8_ACTIVATION, KERNEL_WEIGHT)):
            x_q = _fake_quantize(x, activation, *compute_qparams(lo, hi, activation))
            results.append(sqnr_db(y, F.linear(x_q, _weight_fake_quantized(weight, weight_spec), bias)))
        return results[0], results[1]

    def _plan_int8(self, gm: fx.GraphModule, observer_node: fx.Node, observer: Observer,
                   readers: list[fx.Node]) -> None:
        lo, hi = observer.range()
        int8 = MinMaxObserver(INT8_ACTIVATION, observer.name)
        int8.lo, int8.hi = lo, hi
        int8.batches, int8.batch_ranges = observer.batches, list(observer.batch_ranges)
        observer_node.target = add_submodule(gm, int8, "observer")
        for node in readers:
            plan = get_qspec(node)
            edges = []
            for index, edge in plan.inputs:
                spec = {"activation": INT8_ACTIVATION, "weight": KERNEL_WEIGHT}[edge.role]
                edges.append((index, replace(edge, spec=spec)))
            if len(node.args) > 2 and constant_value(gm, node.args[2]) is not None:
                edges.append((2, EdgeQuant("bias", QuantSpec("int32", granularity=KERNEL_WEIGHT.granularity))))
            set_qspec(node, QuantAnnotation(inputs=tuple(edges), rule=f"{plan.rule}; {self.name}: INT8 at least as "
                                                                       "faithful, and faster on this CPU"))
