"""Quantization-aware training: a trainable fake-quant graph, its lowering, and distillation.

    qat = qcompile.prepare_qat(model, example_inputs, target="cpu-int8", calibration_data=batches)
    ...                                   # a normal training loop over qat.parameters()
    qm = qcompile.convert_qat(qat)        # a QuantizedModel: report, save/load, export_onnx

``prepare_qat`` captures the model in training mode (dropout and BatchNorm as training ops) and
runs :data:`QAT_PREPARE`: the PTQ plan (``annotate``, so QAT quantizes exactly what PTQ
would; weights a spec rounds by ``gptq`` or corrects by ``correct-bias`` rounded as PTQ rounds
them), observers calibrated on the data, then ``insert-fake-quant``, which puts a trainable
:class:`~qcompile.fake_quant.FakeQuantize` at every planned point with its scale started at
the calibrated one (a rounded weight's at its grid, so training starts from the PTQ model), and
trains convolutions before a BatchNorm in their folded form. The
graph's ``training-ops`` switches follow ``.train()`` / ``.eval()``, and
:meth:`QatModel.freeze_batchnorm` keeps BatchNorm on its running statistics for the last steps.

``convert_qat`` runs ``lower-qat`` (learned scales become the Q/DQ graph's constants,
BatchNorm folded for real) in place of ``convert``, then the target's own convert and lower
stages, unchanged. The lowered model equals the fake-quant model in eval mode within a
quantization step. Integer and float8 specs train alike (``target="cpu-fp8"``: E4M3 / E5M2
fake-quants, lowered by the same ``lower-qat`` in place of ``cast-fp8``).

:class:`Distillation` is the float model as a teacher, a loss over outputs and hidden states
matched by module name, usable in one's own loop; :func:`fit` is that loop for the common case.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from qcompile.api import QuantizedModel, complete_report, find_example, kernel_checks
from qcompile.calibration import as_call
from qcompile.capture import capture, eval_mode, train_mode
from qcompile.context import CompileContext
from qcompile.errors import QCompileError
from qcompile.fake_quant import DynamicFakeQuantize, FakeQuantize, FakeQuantizeBias
from qcompile.ir.graph import add_submodule, copy_graph_module
from qcompile.ir.meta import get_provenance
from qcompile.kernel_check import check_kernels
from qcompile.outliers import Smoothing, check_smoothing
from qcompile.passes.lower_qat import LowerQat
from qcompile.passes.prune_weights import PruneWeights
from qcompile.passes.training_ops import ModeSwitchedOp
from qcompile.pass_manager import PassManager
from qcompile.pipeline import Pipeline
from qcompile.qconfig import OpQuantConfig, QConfig
from qcompile.report import CompileReport
from qcompile.spec import QuantSpec
from qcompile.targets import Target, get_target
from qcompile.targets.base import CLEANUP, PLAN

# The PTQ prepare without BatchNorm folding (QAT trains BatchNorm), with the mode switches before
# the plan and fake quantization after it.
QAT_PREPARE = (f"canonicalize,normalize-linears,conv1d-as-conv2d,eliminate-dead-code,training-ops,{PLAN},"
               "insert-fake-quant")
# The report's SQNR compares the lowered model with the trained float one on this many batches.
SQNR_BATCHES = 8
# Below this SQNR (dB) of the lowered model against its fake-quant model, convert_qat warns.
LOWERING_SQNR_DB = 40.0


def learnable(qconfig: QConfig) -> QConfig:
    """``qconfig`` with every spec's scale learnable (LSQ): QAT's default. A spec given with
    ``learnable_scale=False`` by the user's own QConfig keeps its calibrated scale fixed."""

    def spec(s: QuantSpec | None) -> QuantSpec | None:
        return None if s is None else dataclasses.replace(s, learnable_scale=True)

    def choice(c: OpQuantConfig | None) -> OpQuantConfig | None:
        return None if c is None else dataclasses.replace(c, activation=spec(c.activation), weight=spec(c.weight))

    return QConfig(
        default=choice(qconfig.default),
        by_op={k: choice(v) for k, v in qconfig.by_op.items()},
        by_module_type={k: choice(v) for k, v in qconfig.by_module_type.items()},
        by_module_regex=tuple((k, choice(v)) for k, v in qconfig.by_module_regex),
        by_module_name={k: choice(v) for k, v in qconfig.by_module_name.items()},
        by_node={k: choice(v) for k, v in qconfig.by_node.items()},
        node_reasons=dict(qconfig.node_reasons),
    )


class _Tap(nn.Module):
    """Identity that keeps the last value through it: a hidden state read for distillation."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.value = x
        return x


class QatModel(nn.Module):
    """The QAT graph: trainable like the model it came from (``parameters()`` are its weights and
    the fake-quant scales, ``train()`` / ``eval()`` switch dropout and BatchNorm, ``state_dict``
    round-trips), and what :func:`convert_qat` lowers."""

    def __init__(self, graph_module: fx.GraphModule, target: str, example: tuple[tuple, dict],
                 snapshots: dict[str, fx.GraphModule], batches: list[Any],
                 report: CompileReport, properties: frozenset[str]):
        super().__init__()
        self.graph_module = graph_module
        self.target = target
        self.example = example
        # Plain attributes, not submodules: the graph the plan was made on (``annotate``) and the
        # float model as it was before training (``float-reference``, folded), which the report's
        # SQNR compares the lowered model with.
        self.__dict__["_snapshots"] = snapshots
        self.__dict__["_batches"] = batches
        self.report = report
        self.properties = properties

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def fake_quantizers(self) -> dict[str, FakeQuantize]:
        return {name: m for name, m in self.graph_module.named_children() if isinstance(m, FakeQuantize)}

    def freeze_batchnorm(self, frozen: bool = True) -> QatModel:
        """BatchNorm on its running statistics, not updated, while the rest trains (the last
        steps of QAT, so that the folded form the model is lowered to is the one it trains)."""
        for module in self.graph_module.children():
            if isinstance(module, ModeSwitchedOp) and module.op == torch.ops.aten.batch_norm.default:
                module.freeze(frozen)
        return self

    def disable_dropout(self, disabled: bool = True) -> QatModel:
        """Dropout (and attention dropout) off while training: what distillation towards a
        float teacher in eval mode wants."""
        for module in self.graph_module.children():
            if isinstance(module, ModeSwitchedOp) and module.op != torch.ops.aten.batch_norm.default:
                module.freeze(disabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> QatModel:
        """Fake quantization on (the default) or off (the float model with the same weights)."""
        for module in self.graph_module.children():
            if isinstance(module, (FakeQuantize, DynamicFakeQuantize, FakeQuantizeBias)):
                module.enabled = enabled
        return self

    def tap(self, module_name: str) -> _Tap:
        """A reader of the output of the user module ``module_name``: the value of the last of its
        own ops inside it, by the graph's module stack (a value a pass added there, such as
        smoothing's rescaled copy of the output, is not the module's output)."""
        gm = self.graph_module
        last = None
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            val = node.meta.get("val")
            provenance = get_provenance(node)
            own = provenance is None or provenance.pass_name == "training-ops"  # a switch is the op itself
            if own and any(path == module_name for path, _ in stack.values()) and isinstance(val, Tensor) \
                    and val.is_floating_point():
                last = node
        if last is None:
            raise QCompileError(f"no value of the QAT graph was computed in module '{module_name}' "
                                "(module names are those of model.named_modules())")
        name = add_submodule(gm, _Tap(), "tap")
        with gm.graph.inserting_after(last):
            node = gm.graph.call_module(name, (last,))
        node.meta["val"] = last.meta["val"]
        last.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        gm.recompile()
        return gm.get_submodule(name)

    def remove_taps(self) -> None:
        gm = self.graph_module
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _Tap):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                delattr(gm, node.target)
        gm.recompile()


def _own_tensors(gm: fx.GraphModule) -> None:
    """Every parameter and buffer of the captured graph becomes its own copy: training updates
    weights and BatchNorm statistics in place, and the user's model must not see it."""
    for module in gm.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer.detach().clone(),
                                   persistent=name not in module._non_persistent_buffers_set)


def _train_made_weights(gm: fx.GraphModule) -> None:
    """Weights a prepare pass made (smoothing's W ⊙ s⁻¹ and its split rows) are constant
    buffers; the fake-quantized ones become parameters (the same tensors), so QAT trains them."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FakeQuantize):
            continue
        source = node.args[0]
        if source.op != "get_attr":
            continue
        owner_name, _, name = source.target.rpartition(".")
        owner = gm.get_submodule(owner_name)
        if name in owner._buffers and owner._buffers[name].is_floating_point():
            tensor = owner._buffers.pop(name)
            owner.register_parameter(name, nn.Parameter(tensor))


def prepare_qat(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    target: str | Target = "cpu-int8",
    qconfig: QConfig | None = None,
    calibration_data: Iterable[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    prune: PruneWeights | None = None,
    outlier_smoothing: Smoothing = 0.75,
) -> QatModel:
    """The model's training graph with trainable fake quantization (module docstring), in
    training mode. Scales start at those calibrated on ``calibration_data`` (the example inputs
    when there is none); ``qconfig`` defaults to the target's preset with learnable scales.
    ``prune`` (``PruneWeights(sparsity=0.5)`` or ``PruneWeights(pattern="2:4")``) masks the
    planned weights by magnitude before training, and the masks hold through it.
    ``outlier_smoothing`` is compile's (``smooth-outliers`` before the plan); the weights it
    rescales are trained like the others."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat() needs an nn.Module, got {type(model).__name__}")
    check_smoothing(outlier_smoothing)
    if not any(p.requires_grad for p in model.parameters()):
        raise QCompileError(f"{type(model).__name__} has no trainable parameters: there is nothing for QAT to train "
                            "(use qcompile.compile for post-training quantization)")
    target = target if isinstance(target, Target) else get_target(target)
    args, kwargs, calibration_data = find_example(model, example_inputs, example_kwargs, calibration_data)
    if calibration_data is None:
        if args and kwargs:
            raise QCompileError("prepare_qat needs calibration_data when the example has both positional and "
                                "keyword inputs")
        calibration_data = [dict(kwargs) if kwargs else tuple(args)]
    calibration_data = list(calibration_data)
    report = CompileReport(target.name, "qat")
    with train_mode(model) as was_eval:
        graph = capture(model, args, kwargs)
    if was_eval:
        message = (f"{type(model).__name__} was in eval mode: QAT captures it in training mode (dropout and "
                   "BatchNorm as training ops), leaves the model as it was, and returns the QAT model in training mode")
        report.notes.append(message)
        warnings.warn(message, stacklevel=2)
    # A plain GraphModule (export's own refuses train() and eval()) over tensors of its own, in eval
    # mode while it is prepared, so that calibration leaves BatchNorm statistics alone.
    graph = copy_graph_module(graph)
    _own_tensors(graph)
    graph.eval()
    with eval_mode(model):
        reference = copy_graph_module(capture(model, args, kwargs))
    _own_tensors(reference)
    reference = PassManager(Pipeline.parse(CLEANUP))(reference).graph_module
    context = CompileContext(target, (args, kwargs), qconfig=learnable(qconfig if qconfig is not None else
                                                                       target.preset()),
                             calibration_data=calibration_data, progress=progress, report=report,
                             outlier_smoothing=outlier_smoothing)
    pipeline = Pipeline.parse(QAT_PREPARE)
    if prune is not None:
        pipeline.insert_after("annotate", prune)
    graph = context.run_stage("prepare", pipeline, graph)
    _train_made_weights(graph)
    for node, reason in report.diagnostics("unsupported").items():
        warnings.warn(f"{node} stays float: {reason}", stacklevel=2)
    step = max(1, len(calibration_data) // SQNR_BATCHES)
    qat = QatModel(graph, target.name, (args, kwargs), {"plan": context.snapshots["plan"],
                                                        "float-reference": reference},
                   calibration_data[::step][:SQNR_BATCHES], report, context.properties)
    return qat.train()


def convert_qat(qat: QatModel) -> QuantizedModel:
    """The trained QAT model lowered for its target (module docstring), with the same report,
    save/load and ONNX export as a compiled model. The QAT model is left as it was."""
    if not isinstance(qat, QatModel):
        raise TypeError(f"convert_qat() takes the model prepare_qat returned, got {type(qat).__name__}")
    qat.remove_taps()
    target = get_target(qat.target)
    context = CompileContext(target, qat.example, report=copy.deepcopy(qat.report),
                             calibration_data=qat._batches, properties=qat.properties,
                             snapshots=dict(qat._snapshots))
    # lower-qat makes every fake-quant a Q/DQ pair, integer and float8 alike: it takes the place
    # of both conversions of observed graphs (cast-fp8 for float8 edges, convert for the rest).
    pipeline = target.pipeline("convert").replace("convert", LowerQat())
    if "cast-fp8" in pipeline.names():
        pipeline.remove("cast-fp8")
    with eval_mode(qat), torch.no_grad():
        graph = context.run_stage("convert", pipeline, qat.graph_module)
        graph = context.run_stage("lower", target.pipeline("lower"), graph)
        context.report.kernel_calls_checked = check_kernels(graph, kernel_checks(context))
        complete_report(context, graph)
        _check_lowering(qat, context.snapshots["convert"], qat._batches, context.report)
    return QuantizedModel(graph, context.snapshots["convert"], context.report, qat.example)


def _check_lowering(qat: QatModel, qdq: fx.GraphModule, batches: list[Any], report: CompileReport) -> None:
    """The Q/DQ graph ``lower-qat`` made against the fake-quant model in eval mode, on the
    calibration batches: the same integers up to the fold's float rounding, so any output below
    ``LOWERING_SQNR_DB`` is said out loud. (The kernels are held to the Q/DQ graph by the
    kernel check; float parts a target runs in bf16 differ from both by bf16 rounding.)"""
    signal = noise = 0.0
    for batch in batches:
        args, kwargs = as_call(batch)
        expected = [t for t in pytree.tree_leaves(qat(*args, **kwargs)) if isinstance(t, Tensor)]
        actual = [t for t in pytree.tree_leaves(qdq(*args, **kwargs)) if isinstance(t, Tensor)]
        for e, a in zip(expected, actual, strict=True):
            if e.is_floating_point():
                signal += float(e.double().square().sum())
                noise += float((a.double() - e.double()).square().sum())
    db = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    report.notes.append(f"Q/DQ graph against the fake-quant model in eval mode: output SQNR {db:.1f} dB "
                        f"on {len(batches)} calibration batches")
    if db < LOWERING_SQNR_DB:
        warnings.warn(f"the QAT model's Q/DQ graph is {db:.1f} dB from its fake-quant model (expected above "
                      f"{LOWERING_SQNR_DB:g} dB): lowering changed what was trained", stacklevel=3)


def _relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    return (student.float() - teacher.float()).square().mean() / teacher.float().square().mean().clamp_min(1e-12)


def _output_loss(kind: str, temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "mse":
        return _relative_mse
    if kind == "cosine":
        return lambda s, t: (1 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=-1)).mean()
    if kind == "kl":
        return lambda s, t: F.kl_div(F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature,
                                     -1), log_target=True, reduction="batchmean") * temperature ** 2
    raise QCompileError(f"distillation output loss '{kind}' is not one of: mse, cosine, kl")


class Distillation:
    """The float model as teacher of the QAT model:

        loss = L_out(student(x), teacher(x)) + hidden_weight · Σ_m ‖h_m^s − h_m^t‖² / ‖h_m^t‖²

    over the floating-point outputs (``output_loss``: ``mse`` relative to the teacher's power,
    ``cosine`` per sample, ``kl`` of softmaxes at ``temperature``) and the outputs of the modules
    named in ``layers`` (by ``named_modules()`` name, in both models). Use it in a loop of one's
    own, ``loss, output = distill(batch_inputs)``, and ``close()`` it (or use ``with``) to remove
    its readers."""

    def __init__(self, student: QatModel, teacher: nn.Module, *, layers: Sequence[str] = (),
                 output_loss: str = "mse", temperature: float = 1.0, hidden_weight: float = 1.0):
        self.student, self.teacher = student, teacher
        self.output_loss = _output_loss(output_loss, temperature)
        self.hidden_weight = hidden_weight
        modules = dict(teacher.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise QCompileError(f"distillation layers not in the teacher: {', '.join(missing)}")
        self._teacher_values: dict[str, Tensor] = {}
        self._hooks = [modules[name].register_forward_hook(self._keeper(name)) for name in layers]
        self._taps = {name: student.tap(name) for name in layers}

    def _keeper(self, name: str) -> Callable:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self._teacher_values[name] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        with torch.no_grad(), eval_mode(self.teacher):
            target = self.teacher(*args, **kwargs)
        output = self.student(*args, **kwargs)
        pairs = [(s, t) for s, t in zip(pytree.tree_leaves(output), pytree.tree_leaves(target), strict=False)
                 if isinstance(s, Tensor) and s.is_floating_point() and isinstance(t, Tensor) and s.shape == t.shape]
        if not pairs:
            raise QCompileError("distillation: the QAT model and the teacher have no floating-point output in common")
        loss = sum(self.output_loss(s, t) for s, t in pairs) / len(pairs)
        for name, tap in self._taps.items():
            loss = loss + self.hidden_weight * _relative_mse(tap.value, self._teacher_values[name])
        return loss, output

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.student.remove_taps()

    def __enter__(self) -> Distillation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def diverged_scale(qat: QatModel) -> str | None:
    """The first fake-quant whose scale, or its gradient, is no longer finite: where training diverged."""
    for module in qat.fake_quantizers().values():
        for value in (module.log_scale, module.log_scale.grad):
            if value is not None and not bool(torch.isfinite(value).all()):
                return module.name
    return None


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (from 0) of ``steps`` relative to the base one:
    ``constant`` 1; ``cosine`` ½(1 + cos(π·step/steps)), from 1 down towards 0, so the last
    steps, where a weight sits near a rounding boundary, move it least."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return 1.0


def fit(qat: QatModel, teacher: nn.Module, data: Iterable[Any], steps: int, *, lr: float = 1e-4,
        scale_lr: float | None = None, lr_schedule: str = "constant", layers: Sequence[str] = (),
        output_loss: str = "mse", freeze_batchnorm_after: int | None = None,
        progress: bool | None = None) -> list[float]:
    """``steps`` steps of Adam on the distillation loss over ``data`` (model inputs, cycled),
    weights at ``lr`` and fake-quant scales at ``scale_lr`` (default ``lr``), both times
    :func:`lr_factor` of ``lr_schedule``; BatchNorm frozen after ``freeze_batchnorm_after``
    steps. Returns the loss of each step. A loss that is no longer finite is an error naming
    the node whose scale diverged, if one did."""
    if steps <= 0:
        raise QCompileError(f"fit needs a positive number of steps, got {steps}")
    if lr_schedule not in LR_SCHEDULES:
        raise QCompileError(f"fit: lr_schedule {lr_schedule!r} is not one of: {', '.join(LR_SCHEDULES)}")
    quantizer_params = {id(p) for m in qat.fake_quantizers().values() for p in m.parameters()}
    weights = [p for p in qat.parameters() if p.requires_grad and id(p) not in quantizer_params]
    scales = [p for p in qat.parameters() if p.requires_grad and id(p) in quantizer_params]
    optimizer = torch.optim.Adam([{"params": weights, "lr": lr},
                                  {"params": scales, "lr": scale_lr if scale_lr is not None else lr}])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(lr_schedule, step, steps))
    batches = itertools.cycle(data) if isinstance(data, (list, tuple)) else _cycle(data)
    losses: list[float] = []
    disable = None if progress is None else not progress
    qat.train()
    with Distillation(qat, teacher, layers=layers, output_loss=output_loss) as distill:
        for step in tqdm(range(steps), desc="QAT", unit="step", disable=disable):
            if freeze_batchnorm_after is not None and step == freeze_batchnorm_after:
                qat.freeze_batchnorm()
            args, kwargs = as_call(next(batches))
            loss, _ = distill(*args, **kwargs)
            optimizer.zero_grad()
            loss.backward()
            if not math.isfinite(float(loss)):
                where = diverged_scale(qat)
                raise QCompileError(f"QAT step {step}: the loss is {float(loss)}" + (
                    f"; the scale of {where} diverged" if where else "") + " (lower the learning rate)")
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
    return losses


def _cycle(data: Iterable[Any]) -> Iterable[Any]:
    """``data`` again and again (a DataLoader re-iterates, so each pass reshuffles)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise QCompileError("fit: the data is empty")
