"""cpu-int8 benchmark: qcompile against the int8 and bf16 paths people use today, same run, same data.

One table per workload, every row measured in this run (2 threads, median of 10 calls after 2
warm-up calls): fp32 eager, bf16 eager, torch.compile bf16 with freezing, torch's
``quantize_dynamic``, torchao PT2E + Inductor, OpenVINO + NNCF, ONNX Runtime ``quantize_static``
(QDQ, uint8 activations, per-channel weights), and qcompile cpu-int8 (all linears int8; for
MiniLM also without outlier smoothing, ``outlier_smoothing=None``, to show what it buys, and
with every linear's activations quantized per token at run time, dynamic int8).
Competitors are optional (``pip install -e '.[bench]'``); a row whose tool is missing says so.
A row that brings a compiler or runtime of its own (torch.compile, torchao, OpenVINO, ONNX
Runtime) is built, scored and timed in a process of its own (:mod:`benchmarks.isolated` says why),
so nothing but torch and qcompile runs in the process that times qcompile.

Workloads: all-MiniLM-L6-v2 (batch 32 x 128 tokens of real sentences, first sentences of
standard-library docstrings, 256 to calibrate and 256 others to evaluate: mean-pooled embedding
cosine vs fp32 and top-1 nearest-neighbour agreement; each row is also timed on one sentence,
1 x 128 tokens, a server's per-request latency), ResNet-18 (batch 8 x 3 x 224 x 224),
and a CNN trained here on scikit-learn's digits (top-1 accuracy).

Under the MiniLM and ResNet tables, a "head to head" line: qcompile and the rows that matter most
(bf16 eager, OpenVINO, ...) timed again in alternation, a few calls each per round (each row in
the process it lives in), with qcompile's speed-up over each as the median of per-round ratios
(this machine's speed drifts by up to 2x within a run, which skews rows timed one after
another). Then a "limit" line: the
oneDNN int8 kernels' own time in qcompile's model (profiled), what the model would take if
everything around them were free, and the top 10 ops by self time.

Run: ``python -m benchmarks.cpu_int8 [minilm] [resnet] [digits]`` (all three by default).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import qcompile
from benchmarks.agreement import embedding_agreement
from benchmarks.ort_baselines import float_onnx_file, quantize_static_file, session_runner
from benchmarks.isolated import IsolatedPath
from benchmarks.timing import block_ms, interleaved_ms, interleaved_samples, median_ms
from qcompile.profile import profile_ops
from qcompile.qconfig import INT8_WEIGHT, TOKEN_ACTIVATION
from tests.models import (
    BasicBlock,
    SentenceEmbedder,
    TinyConvNet,
    docstring_sentences,
    load_minilm,
    minilm_inputs,
    resnet18,
)


@dataclass
class Row:
    name: str
    ms: float | None = None
    quality: str = ""
    size_mb: float | None = None
    note: str = ""
    ms_one: float | None = None  # one sample (MiniLM: 1 x 128 tokens), the latency a server sees per request
    run: Callable[[], object] | None = field(default=None, repr=False)  # the timed call, for the head-to-head
    run_one: Callable[[], object] | None = field(default=None, repr=False)
    process: IsolatedPath | None = field(default=None, repr=False)  # where the row lives, if not here


def tensor_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def print_table(title: str, rows: list[Row], fp32_ms: float, bf16_ms: float) -> None:
    one = any(r.ms_one is not None for r in rows)
    print(f"\n{title}")
    print(f"{'path':<34}{'ms':>9}{'vs fp32':>9}{'vs bf16':>9}" + (f"{'ms 1x':>9}" if one else "") + f"{'MB':>8}  quality")
    for r in rows:
        if r.ms is None:
            print(f"{r.name:<34}{'-':>9}{'':>9}{'':>9}" + (f"{'':>9}" if one else "") + f"{'':>8}  {r.note}")
            continue
        size = f"{r.size_mb:.2f}" if r.size_mb is not None else ""
        single = (f"{r.ms_one:>9.2f}" if r.ms_one is not None else f"{'':>9}") if one else ""
        print(f"{r.name:<34}{r.ms:>9.1f}{fp32_ms / r.ms:>8.2f}x{bf16_ms / r.ms:>8.2f}x{single}{size:>8}  {r.quality}"
              + (f"  ({r.note})" if r.note else ""))


# The int8 kernels whose time alone is a workload's limit on this CPU.
INT8_KERNEL_OPS = ("onednn::qlinear_pointwise", "onednn::qconv2d_pointwise")


def print_limit_and_profile(row: Row, call: Callable[[], object]) -> None:
    """qcompile's row against its limit, the oneDNN int8 GEMMs / convolutions alone at the
    throughput they reach in the model (everything else free), and its top 10 ops by self time."""
    ops = profile_ops(call, top=10_000)
    limit = sum(op["ms"] for op in ops if op["op"] in INT8_KERNEL_OPS)
    print(f"limit: int8 kernels alone {limit:.1f} ms; {row.name} at {row.ms:.1f} ms is {row.ms / limit:.2f}x the limit "
          f"(the rest: {row.ms - limit:.1f} ms)")
    print(f"  {'op (qcompile, top 10 by self time)':<44}{'calls':>7}{'ms':>9}")
    for op in ops[:10]:
        print(f"  {op['op']:<44}{op['calls']:>7}{op['ms']:>9.2f}")


def print_head_to_head(rows: list[Row], names: tuple[str, ...], what: str, one: bool = False,
                       rounds: int = 10) -> None:
    """The named rows timed again in alternation (:func:`benchmarks.timing.interleaved_samples`;
    a row built in a process of its own is timed there), and qcompile's speed-up over each as
    the median of per-round ratios: the comparison a drifting machine does not skew, where the
    table's rows were timed one after another."""
    samplers = {r.name: sampler for r in rows if r.name in names and (sampler := row_sampler(r, one)) is not None}
    ours = names[-1]
    if ours not in samplers or len(samplers) < 2:
        return
    timed = interleaved_samples(samplers, rounds)
    print(f"head to head, {what}, {rounds} alternated rounds of 5 calls: " + ", ".join(
        f"{name} {timed.median(name):.2f} ms" + ("" if name == ours else f" ({timed.ratio(ours, name):.2f}x)")
        for name in samplers) + f"  [(Nx): {ours} is N times faster, median of per-round ratios]")


def row_sampler(row: Row, one: bool) -> Callable[[int], float] | None:
    """``sampler(n)``: the median ms of n calls of the row's batch (or single-request) call,
    timed where the row lives; None if the row has no such measured call."""
    if (row.ms_one if one else row.ms) is None:
        return None
    if row.process is not None:
        return lambda n: row.process.sample(n, one)
    call = row.run_one if one else row.run
    return None if call is None else block_ms(call)


def isolated_row(name: str, build: Callable[[], Row]) -> Row:
    """The row ``build()`` makes, built, scored and timed in a process of its own
    (:mod:`benchmarks.isolated` says why)."""
    try:
        path = IsolatedPath(build)
    except (RuntimeError, TimeoutError) as exc:
        return Row(name, note=f"failed: {exc}")
    if path.row.ms is None:
        path.close()
        return path.row
    return dataclasses.replace(path.row, process=path)


def close_isolated(rows: list[Row]) -> None:
    for row in rows:
        if row.process is not None:
            row.process.close()


def print_dispatch(model: qcompile.QuantizedModel, inputs: dict[str, tuple[tuple, dict]], rounds: int = 10) -> None:
    """The compiled model as it runs (its lowered graph as one native call, inputs checked)
    against the same graph run as the GraphModule's Python code (not checked), alternated, for
    each named (args, kwargs): what the per-node Python dispatch costs."""
    def fx_code(args: tuple, kwargs: dict) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return model.graph_module(*args, **kwargs)
        return call

    print(f"dispatch: the compiled model runs as {model.runs_on}")
    for what, (args, kwargs) in inputs.items():
        timed = interleaved_ms({"native": lambda a=args, k=kwargs: model(*a, **k), "fx": fx_code(args, kwargs)},
                               rounds)
        print(f"  {what}: one native call {timed.median('native'):.2f} ms, the GraphModule's Python code "
              f"{timed.median('fx'):.2f} ms ({timed.ratio('native', 'fx'):.2f}x)")


def attempt(name: str, build: Callable[[], Row]) -> Row:
    try:
        return build()
    except ImportError as exc:
        return Row(name, note=f"not installed ({exc.name}); pip install -e '.[bench]'")
    except Exception as exc:  # a competitor failing is a result to print, not a crash
        return Row(name, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")


def inductor_bf16(model: torch.nn.Module, call: Callable[[torch.nn.Module], object]) -> torch.nn.Module:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        call(compiled)
    return compiled


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm_data() -> tuple[list[dict], list[dict]]:
    """256 sentences to calibrate and 256 others to evaluate, in batches of 32 x 128 tokens."""
    _, tokenizer = load_minilm()
    sentences = docstring_sentences(512)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 32]) for i in range(0, 256, 32)]
    evaluation = [minilm_inputs(tokenizer, sentences[i:i + 32]) for i in range(256, 512, 32)]
    return calibration, evaluation


class MiniLM:
    """The MiniLM workload every row is built and scored on, in whichever process builds it:
    the fp32 model, the calibration and evaluation batches, the reference embeddings."""

    def __init__(self) -> None:
        model, _ = load_minilm()
        self.calibration, self.evaluation = minilm_data()
        self.fp32 = SentenceEmbedder(model).eval()
        with torch.no_grad():
            self.reference = torch.cat([self.fp32(**b) for b in self.evaluation])
        self.batch = self.evaluation[0]
        self.one = {k: v[:1] for k, v in self.batch.items()}  # a single request, still padded to 128 tokens

    def quality(self, run: Callable[[dict], torch.Tensor]) -> str:
        with torch.no_grad():
            return embedding_agreement(torch.cat([run(b).float() for b in self.evaluation]), self.reference)

    def single_ms(self, module: Callable) -> float | None:
        try:
            return median_ms(lambda: module(**self.one))
        except Exception:  # a path compiled for the batch of 32 only (torchao's export is static)
            return None

    def row(self, name: str, module: Callable, size: int | None = None, note: str = "") -> Row:
        return Row(name, median_ms(lambda: module(**self.batch)), self.quality(lambda b: module(**b)),
                   None if size is None else size / 2**20, note, self.single_ms(module),
                   lambda: module(**self.batch), lambda: module(**self.one))


# The rows that bring a compiler or runtime of their own, each built in a process of its own.
MINILM_COMPETITORS: dict[str, Callable[[MiniLM], Row]] = {
    "torch.compile bf16 (freezing)": lambda w: w.row("torch.compile bf16 (freezing)", inductor_bf16(
        SentenceEmbedder(load_minilm()[0]).eval(), lambda m: m(**w.batch))),
    "torchao PT2E + Inductor int8": lambda w: pt2e_int8(w.fp32, w.batch, w.calibration, w.row),
    "OpenVINO + NNCF int8": lambda w: openvino_int8(w.fp32, w.batch, w.calibration, w.row),
    "ONNX Runtime quantize_static": lambda w: ort_static(w.fp32, w.batch, w.calibration, w.row),
}


def minilm() -> None:
    workload = MiniLM()
    fp32, batch = workload.fp32, workload.batch
    rows = [workload.row("fp32 eager", fp32, tensor_bytes(fp32))]
    bf16_model = SentenceEmbedder(load_minilm()[0].bfloat16()).eval()
    rows.append(workload.row("bf16 eager", bf16_model, tensor_bytes(bf16_model)))

    def dynamic_int8() -> Row:
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(SentenceEmbedder(load_minilm()[0]).eval(), {torch.nn.Linear}, torch.qint8)
        return workload.row("torch quantize_dynamic int8", quantized)

    rows.append(attempt("torch quantize_dynamic int8", dynamic_int8))
    rows += [isolated_row(name, functools.partial(competitor, MiniLM, name)) for name in MINILM_COMPETITORS]
    per_token = qcompile.int8_preset()
    per_token.by_op["linear"] = qcompile.OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)
    compiled, profiled = None, None
    for name, options in [("qcompile cpu-int8", {}), ("qcompile, no outlier smoothing", {"outlier_smoothing": None}),
                          ("qcompile, dynamic int8 per token", {"qconfig": per_token})]:
        start = time.perf_counter()
        qm = qcompile.compile(fp32, calibration_data=workload.calibration, progress=False, **options)
        seconds = time.perf_counter() - start
        rows.append(workload.row(name, qm, tensor_bytes(qm.graph_module), f"compile {seconds:.0f} s"))
        if compiled is None:  # the default row is the one profiled
            compiled, profiled = qm, rows[-1]
    print_table("all-MiniLM-L6-v2, batch 32 x 128 tokens (ms per batch, and per single 1 x 128 request; "
                "embeddings vs fp32 on 256 sentences)",
                rows, rows[0].ms, rows[1].ms)
    print_head_to_head(rows, ("fp32 eager", "bf16 eager", "torchao PT2E + Inductor int8", "OpenVINO + NNCF int8",
                              "qcompile cpu-int8"), "batch")
    print_head_to_head(rows, ("bf16 eager", "OpenVINO + NNCF int8", "qcompile cpu-int8"), "1 x 128", one=True)
    close_isolated(rows)
    print_limit_and_profile(profiled, lambda: compiled(**batch))
    print_dispatch(compiled, {"1 x 128": ((), workload.one), "batch": ((), batch)})


def pt2e_int8(model, batch, calibration, row) -> Row:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    exported = torch.export.export(model, (), dict(batch), strict=False).module()
    # The unused pooler's linear -> tanh has no users; the quantizer's pattern matching fails
    # on a partition without outputs (IndexError in torchao 0.18), so dead code goes first.
    exported.graph.eliminate_dead_code()
    exported.recompile()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in calibration:
            prepared(**b)
    converted = convert_pt2e(prepared)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(converted)
    return row("torchao PT2E + Inductor int8", compiled)


def openvino_int8(model, batch, calibration, row, transformer: bool = True) -> Row:
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=dict(batch))
    dataset = nncf.Dataset(calibration)
    model_type = nncf.ModelType.TRANSFORMER if transformer else None
    quantized = ov.compile_model(nncf.quantize(ov_model, dataset, model_type=model_type), "CPU")
    return row("OpenVINO + NNCF int8", lambda **b: torch.from_numpy(quantized(dict(b))[0]))


def ort_static(model, batch, calibration, row) -> Row:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        fp32_path = float_onnx_file(model, (), dict(batch), Path(folder) / "fp32.onnx", list(batch))
        int8_path = quantize_static_file(fp32_path, [numpy_feeds(b) for b in calibration], Path(folder) / "int8.onnx")
        run = session_runner(int8_path)
    return row("ONNX Runtime quantize_static", lambda **b: run(numpy_feeds(b)))


def numpy_feeds(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# ResNet-18 and the digits CNN


class ResNet:
    """The ResNet-18 workload every row is built and scored on: the model, a batch of 8 images
    and 4 calibration batches (seeded, so every process builds the same ones), fp32's logits."""

    def __init__(self) -> None:
        self.model = resnet18()
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 3, 224, 224, generator=g)
        self.calibration = [(torch.rand(8, 3, 224, 224, generator=g),) for _ in range(4)]
        with torch.no_grad():
            self.reference = self.model(self.images)
        # The competitors' helpers take keyword batches, as MiniLM's are.
        self.feeds = {"x": self.images}
        self.keyword_calibration = [{"x": c} for (c,) in self.calibration]

    def row(self, name: str, module: Callable, size: int | None = None, note: str = "") -> Row:
        with torch.no_grad():
            agree = (module(self.images).float().argmax(1) == self.reference.argmax(1)).float().mean()
        return Row(name, median_ms(lambda: module(self.images)), f"top-1 agreement with fp32 {agree:.2f}",
                   None if size is None else size / 2**20, note, run=lambda: module(self.images))

    def keyword_row(self, name: str, module: Callable, size: int | None = None, note: str = "") -> Row:
        return self.row(name, lambda x: module(x=x), size, note)


class _BlockWithOwnReLUs(BasicBlock):
    """The block with its second ReLU a module of its own: the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_out(out + identity)


def resnet18_for_torchao() -> torch.nn.Module:
    """The benchmark's ResNet-18 with one ReLU module per call. torchao's X86 quantizer groups
    the calls of one module into one partition and refuses one with two outputs ("Input
    partition has more than one output node"), and a BasicBlock calls its ReLU twice (as
    torchvision's does)."""
    model = resnet18()
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.__class__ = _BlockWithOwnReLUs
            block.relu_out = torch.nn.ReLU(inplace=True)
    return model


RESNET_COMPETITORS: dict[str, Callable[[ResNet], Row]] = {
    "torch.compile bf16 (freezing)": lambda w: w.row(
        "torch.compile bf16 (freezing)", compiled_bf16_images(resnet18(), w.images)),
    "torchao PT2E + Inductor int8": lambda w: pt2e_int8(resnet18_for_torchao(), w.feeds, w.keyword_calibration,
                                                        w.keyword_row),
    "OpenVINO + NNCF int8": lambda w: openvino_int8(resnet18(), w.feeds, w.keyword_calibration, w.keyword_row,
                                                    transformer=False),
    "ONNX Runtime quantize_static": lambda w: ort_static(resnet18(), w.feeds, w.keyword_calibration, w.keyword_row),
}


# Each workload's competitors, by the workload's class (which pickles by name).
COMPETITORS: dict[type, dict[str, Callable]] = {MiniLM: MINILM_COMPETITORS, ResNet: RESNET_COMPETITORS}


def competitor(workload: type, name: str) -> Row:
    """The row of ``workload``'s competitor ``name``, built on a workload of its own: what an
    isolated process runs."""
    return attempt(name, lambda: COMPETITORS[workload][name](workload()))


def resnet() -> None:
    workload = ResNet()
    model, images = workload.model, workload.images
    rows = [workload.row("fp32 eager", model, tensor_bytes(model))]
    bf16 = resnet18().bfloat16()
    rows.append(workload.row("bf16 eager", lambda x: bf16(x.bfloat16()), tensor_bytes(bf16)))
    rows += [isolated_row(name, functools.partial(competitor, ResNet, name)) for name in RESNET_COMPETITORS]
    start = time.perf_counter()
    qm = qcompile.compile(model, calibration_data=workload.calibration, progress=False)
    rows.append(workload.row("qcompile cpu-int8", qm, tensor_bytes(qm.graph_module),
                             f"compile {time.perf_counter() - start:.0f} s"))
    print_table("ResNet-18, batch 8 x 3 x 224 x 224 (ms per batch)", rows, rows[0].ms, rows[1].ms)
    print_head_to_head(rows, ("bf16 eager", "torchao PT2E + Inductor int8", "OpenVINO + NNCF int8",
                              "ONNX Runtime quantize_static", "qcompile cpu-int8"), "batch")
    close_isolated(rows)
    print_limit_and_profile(rows[-1], lambda: qm(images))
    print_dispatch(qm, {"batch": ((images,), {}), "1 image": ((images[:1],), {})})


def compiled_bf16_images(model: torch.nn.Module, images: torch.Tensor) -> Callable:
    compiled = inductor_bf16(model, lambda m: m(images.bfloat16()))
    return lambda x: compiled(x.bfloat16())


def digits() -> None:
    from examples.qat_digits import digits as digits_data

    data = digits_data()
    x_train, x_test, y_train, y_test = data.x_train, data.x_test, data.y_train, data.y_test
    model = TinyConvNet().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(30):
        for i in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[i]), y_train[i]).backward()
            optimizer.step()
    model.eval()

    def accuracy(module: Callable) -> float:
        with torch.no_grad():
            return (module(x_test).argmax(1) == y_test).float().mean().item() * 100

    calibration = [(x_train[i:i + 64],) for i in range(0, 256, 64)]
    qm = qcompile.compile(model, calibration_data=calibration, progress=False)
    rows = [Row("fp32 eager", median_ms(lambda: model(x_test)), f"top-1 {accuracy(model):.2f} %",
                tensor_bytes(model) / 2**20)]
    bf16 = TinyConvNet().bfloat16()
    bf16.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    rows.append(Row("bf16 eager", median_ms(lambda: bf16(x_test.bfloat16())),
                    f"top-1 {accuracy(lambda t: bf16(t.bfloat16())):.2f} %", tensor_bytes(bf16) / 2**20))
    rows.append(Row("qcompile cpu-int8", median_ms(lambda: qm(x_test)), f"top-1 {accuracy(qm):.2f} %",
                    tensor_bytes(qm.graph_module) / 2**20))
    print_table(f"digits CNN (scikit-learn digits, {len(x_test)} test images in one batch)", rows,
                rows[0].ms, rows[1].ms)


def main() -> None:
    torch.set_num_threads(2)
    torch.backends.quantized.engine = "onednn"
    workloads = {"minilm": minilm, "resnet": resnet, "digits": digits}
    for name in sys.argv[1:] or list(workloads):
        workloads[name]()


if __name__ == "__main__":
    main()
