"""Compile-time benchmark: capture and pipeline time on real models, and growth with graph size.

Prints capture and ``canonicalize,fold-batchnorm`` time for all-MiniLM-L6-v2 and ResNet-18,
then the pipeline time on synthetic ATen graphs of about 1k, 4k and 16k nodes, with the ratio
to the 1k graph so linear growth can be read off (16k/1k near 16 is linear).

Run: ``make bench`` or ``python -m benchmarks.compile_time``.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import qcompile
from tests.models import load_minilm, minilm_inputs, resnet18

PIPELINE = "canonicalize,fold-batchnorm"
aten = torch.ops.aten


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def synthetic_graph(blocks: int, channels: int = 4) -> fx.GraphModule:
    """``blocks`` repeats of conv -> batch_norm -> relu -> dropout -> clone -> residual add
    (16 nodes each, constants included): the shapes canonicalize and fold-batchnorm rewrite."""
    root = torch.nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    for i in range(blocks):
        tensors = {
            "w": torch.randn(channels, channels, 1, 1),
            "b": torch.randn(channels),
            "gamma": torch.rand(channels) + 0.5,
            "beta": torch.randn(channels),
            "mean": torch.randn(channels),
            "var": torch.rand(channels) + 0.5,
        }
        nodes = {}
        for name, tensor in tensors.items():
            root.register_buffer(f"{name}{i}", tensor)
            nodes[name] = graph.get_attr(f"{name}{i}")
        conv = graph.call_function(aten.conv2d.default, (x, nodes["w"], nodes["b"]))
        bn = graph.call_function(
            aten.batch_norm.default,
            (conv, nodes["gamma"], nodes["beta"], nodes["mean"], nodes["var"], False, 0.1, 1e-5, False),
        )
        relu = graph.call_function(aten.relu.default, (bn,))
        dropped = graph.call_function(aten.dropout.default, (relu, 0.1, False))
        copied = graph.call_function(aten.clone.default, (dropped,))
        x = graph.call_function(aten.add.Tensor, (copied, x))
    graph.output(x)
    gm = fx.GraphModule(root, graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.randn(1, channels, 4, 4)))
    return gm


def real_models() -> None:
    print(f"{'model':<22}{'nodes':>7}{'capture s':>11}{'pipeline s':>12}{'total s':>9}")
    model, tokenizer = load_minilm()
    sentences = ["The quick brown fox jumps over the lazy dog."] * 2
    workloads = [
        ("all-MiniLM-L6-v2", model, (), minilm_inputs(tokenizer, sentences)),
        ("ResNet-18", resnet18(), (torch.randn(2, 3, 224, 224),), {}),
    ]
    for name, module, args, kwargs in workloads:
        capture_s, gm = timed(lambda: qcompile.capture(module, args, kwargs), repeats=1)
        manager = qcompile.PassManager(PIPELINE)
        pipeline_s, _ = timed(lambda: manager(gm))
        print(f"{name:<22}{len(gm.graph.nodes):>7}{capture_s:>11.2f}{pipeline_s:>12.3f}{capture_s + pipeline_s:>9.2f}")


def growth() -> None:
    print(f"\n{'synthetic graph':<22}{'nodes':>7}{'pipeline s':>12}{'ms/1k nodes':>13}{'vs 1k':>8}")
    manager = qcompile.PassManager(PIPELINE)
    base = None
    for blocks in (80, 320, 1280):  # about 1k, 4k and 16k nodes
        gm = synthetic_graph(blocks)
        seconds, _ = timed(lambda: manager(gm), repeats=1 if blocks > 1000 else 3)
        base = base or seconds
        nodes = len(gm.graph.nodes)
        print(f"{f'{blocks} blocks':<22}{nodes:>7}{seconds:>12.3f}{seconds / nodes * 1e6:>13.1f}{seconds / base:>7.1f}x")


if __name__ == "__main__":
    torch.set_num_threads(2)
    real_models()
    growth()
