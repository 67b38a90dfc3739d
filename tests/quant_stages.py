"""The graphs of the cpu-int8 flow, stage by stage, for the pass tests."""

from __future__ import annotations

import torch
from qcompile.passes import (
    Annotate,
    Canonicalize,
    Convert,
    EliminateDeadCode,
    FoldBatchNorm,
    InsertObservers,
)

import qcompile


def cleaned(model: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    gm = qcompile.capture(model, args)
    return qcompile.PassManager([Canonicalize(), FoldBatchNorm(), EliminateDeadCode()])(gm).graph_module


def annotated(model: torch.nn.Module, *args: torch.Tensor, **annotate_options) -> torch.fx.GraphModule:
    return Annotate(**annotate_options)(cleaned(model, *args)).graph_module


def calibrated(model: torch.nn.Module, *args: torch.Tensor, batches: int = 4, **annotate_options) -> torch.fx.GraphModule:
    observed = InsertObservers()(annotated(model, *args, **annotate_options)).graph_module
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(args[0].shape, generator=generator),) for _ in range(batches)]
    qcompile.calibrate(observed, data, (args, {}), progress=False)
    return observed


def qdq(model: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return Convert()(calibrated(model, *args)).graph_module
