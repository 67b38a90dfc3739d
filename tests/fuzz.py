"""The graph fuzzer: seeded random models, compiled for every target and held to what qcompile promises.

Each seed gives a model of one of two families, a sequence model on ``[batch, tokens, width]``
(optionally starting from an embedding of token ids) or an image model on ``[batch, channels,
height, width]``, made of a random program of the ops people build models from: linear, conv,
depthwise conv, relu/gelu, residual and join adds, multiplication by constants, reshape /
transpose / flatten / view, LayerNorm, softmax, concat, mean, max-pool, embedding. For every
target, a compile must either succeed or raise a clean ``QCompileError`` (a
``KernelMismatchError`` counts as a failure: the compile-time check caught a lowering bug),
and a compiled model:

* agrees with its Q/DQ graph kernel by kernel on a fresh input (``check_kernels``), and end to end;
* leaves the user's model bit-identical (parameters, buffers);
* loads back from its saved file and gives the same answer;
* for ``onnx-qdq``, exports a file ONNX Runtime runs and the cross-check accepts.

Run more than the test suite's fixed set with ``make fuzz N=1000`` (``python -m tests.fuzz N``):
it prints counts by outcome and the seeds of any failure.
"""

from __future__ import annotations

import random
import sys
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import qcompile
from qcompile.kernel_check import check_kernels
from qcompile.qconfig import INT8_ACTIVATION, INT8_WEIGHT

# What each model is compiled for: a target and a QConfig (None: the target's preset). cpu-fp8's
# preset here is weight-only E4M3; its W8A8 form also exercises fp8-or-int8's INT8/FP8 mix. The
# rounding config has GPTQ round the linears' weights for the error their bias shift leaves, and
# correct-bias take the mean error of the convolutions' rounded weights.
_ROUNDED = qcompile.QConfig(by_op={
    "linear": qcompile.OpQuantConfig(INT8_ACTIVATION, replace(INT8_WEIGHT, rounding="gptq", bias_correction=True)),
    "conv2d": qcompile.OpQuantConfig(INT8_ACTIVATION, replace(INT8_WEIGHT, bias_correction=True))})
# W4A8 with per-token activations: int4 groups of 8 (every width the models take divides), the
# activations quantized per row at run time in front of the weight-only kernel.
_W4A8_TOKEN = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(
    qcompile.qconfig.TOKEN_ACTIVATION,
    qcompile.QuantSpec("int4", False, qcompile.PerGroup(1, 8)))})
# Dynamic int8: int8 weights, each linear's activations quantized per row at run time and read by
# the int8 kernel with each row's scale and zero point.
_W8A8_TOKEN = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(qcompile.qconfig.TOKEN_ACTIVATION, INT8_WEIGHT)})
CONFIGS = {"cpu-int8": ("cpu-int8", None), "onnx-qdq": ("onnx-qdq", None), "cpu-fp8": ("cpu-fp8", None),
           "cpu-fp8 w8a8": ("cpu-fp8", qcompile.fp8_qconfig()), "cpu-int8 gptq, bias-corrected": ("cpu-int8", _ROUNDED),
           "cpu-int8 w4a8 per-token": ("cpu-int8", _W4A8_TOKEN), "cpu-int8 w8a8 per-token": ("cpu-int8", _W8A8_TOKEN)}
TARGETS = tuple(CONFIGS)


class SequenceModel(nn.Module):
    """``program`` steps applied to ``[batch, tokens, width]``; ``saved`` holds values for adds and concats."""

    def __init__(self, program: list[tuple], width: int, vocabulary: int | None):
        super().__init__()
        self.program, self.vocabulary = program, vocabulary
        self.embedding = nn.Embedding(vocabulary, width) if vocabulary else None
        self.layers = nn.ModuleDict()
        current = width
        for i, (op, *args) in enumerate(program):
            if op == "linear":
                self.layers[str(i)] = nn.Linear(current, args[0])
                current = args[0]
            elif op == "layer_norm":
                self.layers[str(i)] = nn.LayerNorm(current)
            elif op == "concat_linear":
                self.layers[str(i)] = nn.Linear(current, args[0])
                current += args[0]
        self.head = nn.Linear(current, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        saved = x
        for i, (op, *args) in enumerate(self.program):
            if op in ("linear", "layer_norm"):
                x = self.layers[str(i)](x)
            elif op == "concat_linear":
                x = torch.cat([x, self.layers[str(i)](x)], dim=-1)
            elif op == "relu":
                x = torch.relu(x)
            elif op == "gelu":
                x = F.gelu(x)
            elif op == "save":
                saved = x
            elif op == "residual" and saved.shape[-1] == x.shape[-1]:
                x = x + saved
            elif op == "scale":
                x = x * args[0]
            elif op == "softmax":
                x = torch.softmax(x, dim=-1)
            elif op == "heads" and x.shape[-1] % args[0] == 0:
                b, t, c = x.shape
                x = x.view(b, t, args[0], c // args[0]).transpose(1, 2).reshape(b, args[0], t, c // args[0])
                x = x.transpose(1, 2).reshape(b, t, c)
            elif op == "transposed_residual":
                t = x.transpose(1, 2)
                x = (t + t.mean(dim=-1, keepdim=True)).transpose(1, 2)
            elif op == "mean_add":
                x = x + x.mean(dim=1, keepdim=True)
            elif op == "flatten_view":
                x = x.flatten(1).view(x.shape[0], x.shape[1], -1)
        return self.head(x)


class ImageModel(nn.Module):
    def __init__(self, program: list[tuple], channels: int, size: int):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()
        current = channels
        for i, (op, *args) in enumerate(program):
            if op == "conv":
                self.layers[str(i)] = nn.Conv2d(current, args[0], 3, padding=1)
                current = args[0]
            elif op == "depthwise":
                self.layers[str(i)] = nn.Conv2d(current, current, 3, padding=1, groups=current)
            elif op == "concat_conv":
                self.layers[str(i)] = nn.Conv2d(current, args[0], 1)
                current += args[0]
            elif op == "pool":
                size //= 2
        self.head = nn.Linear(current * size * size, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = x
        for i, (op, *args) in enumerate(self.program):
            if op in ("conv", "depthwise"):
                x = self.layers[str(i)](x)
            elif op == "concat_conv":
                x = torch.cat([x, self.layers[str(i)](x)], dim=1)
            elif op == "relu":
                x = torch.relu(x)
            elif op == "save":
                saved = x
            elif op == "residual" and saved.shape == x.shape:
                x = x + saved
            elif op == "scale":
                x = x * args[0]
            elif op == "pool":
                x = F.max_pool2d(x, 2)
            elif op == "mean_add":
                x = x + x.mean(dim=(2, 3), keepdim=True)
        return self.head(x.view(x.shape[0], -1))


@dataclass
class Case:
    seed: int
    model: nn.Module
    inputs: list[torch.Tensor]  # calibration batches, then a fresh input


def _sequence_program(rng: random.Random, steps: int, width: int) -> list[tuple]:
    """Single ops, and the blocks models are made of: a residual FFN, a residual linear."""
    hidden = rng.choice([8, 16, 32])
    singles = [lambda: ("linear", rng.choice([8, 16, 32])), lambda: ("relu",), lambda: ("gelu",), lambda: ("save",),
               lambda: ("residual",), lambda: ("scale", rng.choice([0.5, 2.0, -1.5])), lambda: ("layer_norm",),
               lambda: ("softmax",), lambda: ("heads", 2), lambda: ("transposed_residual",), lambda: ("mean_add",),
               lambda: ("concat_linear", 8), lambda: ("flatten_view",)]
    blocks = [
        lambda: [("save",), ("linear", hidden), (rng.choice(["gelu", "relu"]),), ("linear", width), ("residual",),
                 ("layer_norm",)],
        lambda: [("save",), ("linear", width), ("residual",), (rng.choice(["relu", "gelu"]),)],
    ]
    program = [("linear", width)]  # every model starts at ``width`` channels for its blocks
    while len(program) < steps:
        program += rng.choice(blocks)() if rng.random() < 0.4 else [rng.choice(singles)()]
    return program


def _image_program(rng: random.Random, steps: int, channels: int) -> list[tuple]:
    singles = [lambda: ("conv", rng.choice([4, 8])), lambda: ("depthwise",), lambda: ("relu",), lambda: ("save",),
               lambda: ("residual",), lambda: ("scale", rng.choice([0.5, 3.0])), lambda: ("pool",),
               lambda: ("mean_add",), lambda: ("concat_conv", 4)]
    blocks = [
        lambda: [("save",), ("conv", channels), ("relu",), ("conv", channels), ("residual",), ("relu",)],
        lambda: [("save",), ("depthwise",), ("relu",), ("residual",)],
    ]
    program = [("conv", channels)]
    while len(program) < steps:
        program += rng.choice(blocks)() if rng.random() < 0.4 else [rng.choice(singles)()]
    pools = [i for i, p in enumerate(program) if p[0] == "pool"]
    return [p for i, p in enumerate(program) if i not in pools[2:]]  # 8x8 images take two halvings


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    steps = rng.randint(3, 18)
    if rng.random() < 0.5:
        width, vocabulary = rng.choice([8, 16, 24]), rng.choice([None, 50])
        model = SequenceModel(_sequence_program(rng, steps, width), width, vocabulary).eval()
        tokens = rng.choice([4, 6])
        make = (lambda b: torch.randint(0, vocabulary, (b, tokens), generator=g)) if vocabulary else (
            lambda b: torch.randn(b, tokens, width, generator=g))
    else:
        channels, size = rng.choice([3, 4]), 8
        model = ImageModel(_image_program(rng, steps, channels), channels, size).eval()
        make = lambda b: torch.randn(b, channels, size, size, generator=g)  # noqa: E731
    return Case(seed, model, [make(4) for _ in range(3)] + [make(3)])


def check_case(case: Case, target: str, folder: Path) -> str:
    """'ok', 'refused: <reason>' for a clean QCompileError; raises AssertionError on a broken promise."""
    model = case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration, fresh = [(x,) for x in case.inputs[:-1]], case.inputs[-1]
    try:
        name, qconfig = CONFIGS[target]
        qm = qcompile.compile(model, calibration_data=calibration, target=name, qconfig=qconfig, progress=False)
    except qcompile.KernelMismatchError:
        raise  # compile caught a wrong kernel before the user got it: still a lowering bug
    except qcompile.QCompileError as exc:
        return f"refused: {type(exc).__name__}"
    with torch.no_grad():
        out = qm(fresh)
        reference = qm.qdq_graph_module(fresh)
    check_kernels(qm.graph_module, [("on a fresh input", (fresh,), {})])
    cosine = F.cosine_similarity(out.flatten().double(), reference.flatten().double(), dim=0)
    assert out.shape == reference.shape and (cosine > 0.99 or torch.allclose(out, reference, atol=1e-3)), \
        f"lowered and Q/DQ graphs disagree end to end: cosine {float(cosine):.4f}"
    loaded = qcompile.load(qm.save(folder / f"{case.seed}-{target.replace(' ', '-').replace(',', '')}.qc"))
    assert torch.equal(loaded(fresh), out), "the loaded model answers differently"
    if target == "onnx-qdq":
        qm.export_onnx(folder / f"{case.seed}.onnx")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"the user's {key} changed"
    return "ok"


def run(seeds: range) -> tuple[Counter, list[str]]:
    outcomes, failures = Counter(), []
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            case = make_case(seed)
            for target in TARGETS:
                try:
                    outcome = check_case(case, target, Path(folder))
                except Exception as exc:  # every other exception is a finding
                    outcome = f"FAILED: {type(exc).__name__}"
                    failures.append(f"seed {seed} {target}: {type(exc).__name__}: {str(exc)[:300]}\n"
                                    f"{''.join(traceback.format_exception(exc)[-3:])}")
                outcomes[f"{target} {outcome}"] += 1
    return outcomes, failures


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    outcomes, failures = run(range(1000, 1000 + count))
    print(f"{count} models x {len(TARGETS)} targets")
    for outcome, n in sorted(outcomes.items()):
        print(f"  {n:5d}  {outcome}")
    for failure in failures:
        print(failure)
    sys.exit(1 if failures else 0)
