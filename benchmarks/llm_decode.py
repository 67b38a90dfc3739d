"""Decode at batch 1 on a ~0.5 B-parameter decoder: weight-only int8 / int4 against bf16.

A Qwen2-0.5B-shaped model from its config (width 896, 24 layers, 14 heads / 2 KV heads, MLP
4864, vocabulary 151,936, tied embeddings; 494 M parameters; random weights), 2 threads. Each
path prefills a 64-token prompt, then decodes 64 tokens greedily with the KV cache growing;
the table gives prefill ms, decode ms per token and tokens/s (median of 2 runs after a warm-up),
the bytes of the weights, memory (``benchmarks.resident``: "held MB", the resident memory that
building the path added and kept, that is its weights as the kernels hold them plus anything kept
beside them; "decode MB", the most resident memory above that while it prefilled and decoded:
KV cache, activations and any weight a kernel unpacks per call; the path's peak is their sum,
since the other paths' memory is resident throughout), the share of the 64 tokens equal to
bf16's ("= bf16": random weights give near-flat logits, so this is a stress test of argmax flips,
not a quality figure, and one early flip changes every later token; the trained tiny decoder's
agreement is in ``benchmarks.fp8_vs_int8 decoder``), and "next =": along bf16's own 128 tokens,
the share of positions whose next-token argmax is bf16's, each position on the same context.

qcompile rows are ``compile_decoder`` with every linear weight-only (int8 per channel on
``_weight_int8pack_mm``; int4 in groups of 128, round to nearest, on
``_weight_int4pack_mm_for_cpu`` or qcompile's int4 kernel), activations bf16, or W4A8: the same
int4 weights on uint8 activations quantized per token at run time (``qc.linear_w4a8``, summed in
integers on AVX2 CPUs without AVX512-BF16), as ONNX Runtime's accuracy level 4 quantizes them;
the token table in int8 rows; W8A8: int8 weights per channel on the same per-token uint8
activations (``qc.linear_int8``, each row's scale in the kernel's epilogue). No outlier smoothing: the rows keep ONNX Runtime's arithmetic (it
has none), and random weights have no outlier channels to smooth. The budgeted row is
``compile_decoder(accuracy_budget=BUDGET)``: every linear of the step searched among cpu-int8's
candidates for the fastest mix whose step output cosine (logits and cache) drops by at most
``BUDGET`` on the steps decoded from a prompt of its own, the prefill replaying the step's formats. The ONNX
Runtime rows are the W4 plan's prefill and step exported (``QuantizedDecoder.export_onnx``:
``MatMulNBits`` nodes, each with the accuracy level the export measured safe for it) and run by
ONNX Runtime's CPU provider in the same loop; a second pair of files, the same with every node at
accuracy level 1 (float activations, the Q/DQ graph's arithmetic), shows what int8 activations
buy. torchao's int4 weight-only CPU path is tried and its error printed when this torchao has none
(0.15 on has none: its int4 formats need CUDA or the mslk kernels); the row "ATen int4 g128" is that
path as torchao ran it until 0.14 (``Int4CPULayout``: ATen's ``_weight_int4pack_mm_for_cpu`` on bf16
activations, tinygemm's asymmetric groups of 128), every linear swapped in place. "torch.compile
bf16" is Inductor with frozen weights and dynamic shapes over the same prefill and step.

``python -m benchmarks.llm_decode ort-quantizer`` compares our ONNX export with ONNX Runtime's own
quantizer (``MatMulNBitsQuantizer``, 4 bits, blocks of 128, symmetric, accuracy level 4) on the
same model in ONNX Runtime, both quantizing the linears only (ORT's quantizer leaves the
embedding's Gather float). Its input is an fp32 ONNX file, which for the 494 M-parameter model
passes protobuf's 2 GB limit, so this runs a smaller model of the same shape per layer: 8 layers,
a 32,768-token vocabulary, untied embeddings (so both quantize the lm_head), 178 M parameters.
The fp32 file is our own export of the model compiled with nothing quantized. Random weights
make greedy agreement a coin toss on the first token, so a second table compares fidelity on
the tiny decoder trained in ``tests.models`` (groups of 32): greedy prompts and tokens equal to
the fp32 file's, logit SQNR and next-token agreement.

Run: ``python -m benchmarks.llm_decode [--layers N]`` (N of the 24 layers: a quicker check of the
same shapes per layer) and ``python -m benchmarks.llm_decode ort-quantizer``
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import qcompile
from benchmarks.cpu_int8 import tensor_bytes
from benchmarks.resident import resident_window
from qcompile import OpQuantConfig, PerChannel, PerGroup, QConfig, QuantSpec
from qcompile.decoder import OnnxDecoder, PrefillProgram, StepProgram
from qcompile.qconfig import INT8_WEIGHT, TOKEN_ACTIVATION
from qcompile.targets.onnx_qdq.matmul_nbits import FLOAT_ACTIVATIONS, INT8_ACTIVATIONS, set_accuracy_levels
from qcompile.targets.onnx_qdq.runtime import OnnxRuntimeProgram

PROMPT, NEW_TOKENS = 64, 64
LAYERS = 24
BUDGET = 2e-3  # the budgeted row's largest drop of the step's output cosine (logits and cache)


def qwen2_config(layers: int = LAYERS, vocabulary: int = 151936, tied: bool = True) -> Qwen2Config:
    """Qwen2-0.5B's shapes; fewer layers, a smaller vocabulary or untied embeddings for other runs."""
    return Qwen2Config(vocab_size=vocabulary, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=tied, rope_theta=1e6)


@dataclass
class DecodePath:
    """One row's programs, the bytes of its weights, the resident MB building it kept, and a note."""

    prefill: Callable
    step: Callable
    weight_bytes: int
    held_mb: float
    note: str = ""


@dataclass
class Decoded:
    prefill_ms: float
    token_ms: float
    tokens: torch.Tensor
    peak_mb: float  # resident MB above the resting state, at most, while prefilling and decoding


def decode(prefill: Callable, step: Callable, ids: torch.Tensor) -> Decoded:
    """Prefill and 64 greedy steps, 3 times: timings the median of the last 2 runs, memory the
    peak over all 3."""
    runs, tokens = [], None
    with resident_window() as resident:
        for _ in range(3):
            with torch.no_grad():
                start = time.perf_counter()
                logits, *cache = prefill(ids)
                middle = time.perf_counter()
                produced = []
                for _ in range(NEW_TOKENS):
                    token = logits[:, -1].argmax(-1, keepdim=True)
                    produced.append(token)
                    logits, *cache = step(token, *cache)
                end = time.perf_counter()
            runs.append(((middle - start) * 1e3, (end - middle) * 1e3 / NEW_TOKENS))
            tokens = torch.cat(produced, 1)
            del logits, cache
    return Decoded(statistics.median(r[0] for r in runs[1:]), statistics.median(r[1] for r in runs[1:]), tokens,
                   resident.peak)


def next_token_agreement(prefill: Callable, sequence: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of positions of ``sequence`` where the path's next-token argmax is ``reference``'s
    (the float path's on the same sequence): each position scored on the same context, so one
    flip does not change every later token the way it does in a greedy run."""
    with torch.no_grad():
        return (prefill(sequence)[0].argmax(-1) == reference).float().mean().item()


def torchao_int4(model: torch.nn.Module) -> tuple[Callable, Callable]:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(model, Int4WeightOnlyConfig(group_size=128))
    prefill, step = PrefillProgram(model), StepProgram(model)
    step(torch.zeros(1, 1, dtype=torch.long), *prefill(torch.zeros(1, 4, dtype=torch.long))[1:])  # a CPU kernel?
    return prefill, step


class AtenInt4Linear(torch.nn.Module):
    """torchao's int4 weight-only CPU path as torchao ran it up to 0.14 (``Int4CPULayout``): ATen's
    ``_weight_int4pack_mm_for_cpu`` on bf16 activations, groups of 128 on tinygemm's asymmetric
    grid, w ≈ S·(u − 8) + Z with u = round((w − min) / S) in [0, 15], S = (max − min) / 15 and
    Z = min + 8·S per group. torchao 0.15 on dropped that layout; this keeps its kernel and grid as
    the baseline the issue names."""

    def __init__(self, linear: torch.nn.Linear, group_size: int = 128):
        super().__init__()
        weight = linear.weight.detach().float()
        outputs, inputs = weight.shape
        groups = weight.reshape(outputs, inputs // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-6)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.reshape(outputs, inputs), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), (low + 8 * scale).t()], -1)
                             .to(torch.bfloat16).contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, self.group_size,
                                                        self.scales_and_zeros).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def aten_int4(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """Every linear of a bf16 model (the tied vocabulary projection too, as torchao's ``quantize_``
    takes every ``nn.Linear``) as an :class:`AtenInt4Linear`."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in linears:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, AtenInt4Linear(linear))
    return PrefillProgram(model), StepProgram(model)


def inductor_bf16_decoder(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Callable, Callable, float]:
    """torch.compile (Inductor, weights frozen as constants, shapes dynamic so the growing cache
    does not recompile) of the bf16 prefill and step, and the seconds the first calls took."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    start = time.perf_counter()
    prefill = torch.compile(PrefillProgram(model), dynamic=True)
    step = torch.compile(StepProgram(model), dynamic=True)
    with torch.no_grad():
        logits, *cache = prefill(ids)
        for _ in range(2):  # the second call at a new cache length shows a shape-specialized graph
            logits, *cache = step(logits[:, -1].argmax(-1, keepdim=True), *cache)
    return prefill, step, time.perf_counter() - start


def main(layers: int = LAYERS) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = qwen2_config(layers)
    model = Qwen2ForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, PROMPT), generator=g)
    prompts = [torch.randint(0, config.vocab_size, (1, 32), generator=g) for _ in range(2)]
    eval_prompt = torch.randint(0, config.vocab_size, (1, 32), generator=g)  # the budget search's, not calibrated on
    # The first compile in a process loads torch.export's code and caches: not any path's memory.
    with tempfile.TemporaryDirectory() as folder:
        qcompile.compile_decoder(Qwen2ForCausalLM(qwen2_config(1, 256)).eval(), [p % 256 for p in prompts], calibration_steps=2,
                                 progress=False).export_onnx(folder, threads=2)
    paths: dict[str, DecodePath] = {}
    with resident_window() as held:
        bf16 = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
        bf16.load_state_dict(model.state_dict())
    paths["bf16 eager"] = DecodePath(PrefillProgram(bf16), StepProgram(bf16), tensor_bytes(bf16), held.retained)
    int4 = QuantSpec("int4", granularity=PerGroup(1, 128))
    formats = {"qcompile W8 (weight-only int8)": OpQuantConfig(None, QuantSpec("int8", granularity=PerChannel(0))),
               "qcompile W4 g128 (weight-only int4)": OpQuantConfig(None, int4),
               "qcompile W4A8 g128 (uint8 per token)": OpQuantConfig(TOKEN_ACTIVATION, int4),
               "qcompile W8A8 (uint8 per token)": OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)}
    compiled_by_name = {}
    for name, linear in formats.items():
        start = time.perf_counter()
        with resident_window() as held:
            # no outlier smoothing: ONNX Runtime's arithmetic, and random weights have no outlier channels
            compiled = qcompile.compile_decoder(model, prompts, calibration_steps=2, progress=False,
                                                outlier_smoothing=None,
                                                qconfig=QConfig(by_op={"linear": linear,
                                                                       "embedding": OpQuantConfig(None, INT8_WEIGHT)}))
        seconds = time.perf_counter() - start
        paths[name] = DecodePath(compiled.prefill, compiled.step, tensor_bytes(compiled.prefill.graph_module),
                                 held.retained, f"compile_decoder {seconds:.0f} s")
        print(f"{name}: {compiled.step.report.notes[-1]}")
        compiled_by_name[name] = compiled
    start = time.perf_counter()
    with resident_window() as held:
        compiled = qcompile.compile_decoder(model, prompts, eval_prompts=[eval_prompt], calibration_steps=2,
                                            progress=False, accuracy_budget=BUDGET)
    seconds = time.perf_counter() - start
    chosen = Counter(compiled.step.report.budget["rounds"][-1]["choices"].values())
    paths[f"qcompile budget {BUDGET:g} (searched mix)"] = DecodePath(
        compiled.prefill, compiled.step, tensor_bytes(compiled.prefill.graph_module), held.retained,
        f"compile_decoder {seconds:.0f} s; " + ", ".join(f"{k} x{v}" for k, v in chosen.items()))
    print(f"budget {BUDGET:g}: {compiled.step.report.notes[-2]}")
    with tempfile.TemporaryDirectory() as folder:  # ONNX Runtime reads the files when its sessions start
        start = time.perf_counter()
        with resident_window() as held:
            exported = compiled_by_name["qcompile W4 g128 (weight-only int4)"].export_onnx(folder, threads=2)
        seconds = time.perf_counter() - start
        size = sum(path.stat().st_size for path in Path(folder).glob("*.onnx")) // 2  # both files hold the weights
        levels = [level.level for level in exported.step_export.check.accuracy_levels]
        paths["ONNX Runtime W4 g128 (MatMulNBits)"] = DecodePath(
            exported.prefill, exported.step, size, held.retained,
            f"the same plan exported, {seconds:.0f} s; accuracy level 4 (int8 activations) on "
            f"{levels.count(INT8_ACTIVATIONS)} of the step's {len(levels)} MatMulNBits, measured safe")
        programs = []
        with resident_window() as held:
            for name in ("prefill", "step"):  # the same files with float activations everywhere
                file = onnx.load(Path(folder) / f"{name}.onnx")
                set_accuracy_levels(file, {n.name: FLOAT_ACTIVATIONS for n in file.graph.node
                                           if n.op_type == "MatMulNBits"})
                onnx.save(file, Path(folder) / f"{name}_float_activations.onnx")
                del file
                programs.append(OnnxRuntimeProgram(Path(folder) / f"{name}_float_activations.onnx", threads=2))
        paths["ONNX Runtime W4 g128, accuracy level 1"] = DecodePath(*programs, size, held.retained,
                                                                     "float activations in every MatMulNBits")
    with resident_window() as held:
        compiled_bf16 = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
        compiled_bf16.load_state_dict(model.state_dict())
        prefill, step, seconds = inductor_bf16_decoder(compiled_bf16, ids)
    paths["torch.compile bf16 (freezing)"] = DecodePath(prefill, step, tensor_bytes(compiled_bf16), held.retained,
                                                        f"compile {seconds:.0f} s")
    with resident_window() as held:
        int4 = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
        int4.load_state_dict(model.state_dict())
        prefill, step = aten_int4(int4)
    paths["ATen int4 g128 (torchao <= 0.14 CPU)"] = DecodePath(prefill, step, tensor_bytes(int4), held.retained,
                                                                "_weight_int4pack_mm_for_cpu, bf16 activations")
    try:
        with resident_window() as held:
            ao = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
            ao.load_state_dict(model.state_dict())
            prefill, step = torchao_int4(ao)
        paths["torchao int4 weight-only"] = DecodePath(prefill, step, tensor_bytes(ao), held.retained)
    except Exception as exc:  # a baseline that does not run here is a row of its own
        print(f"torchao int4 weight-only: does not run on this CPU build ({type(exc).__name__}: {str(exc)[:160]})")
    results = {name: decode(path.prefill, path.step, ids) for name, path in paths.items()}
    reference = results["bf16 eager"]
    sequence = torch.cat([ids, reference.tokens], 1)
    with torch.no_grad():
        expected = paths["bf16 eager"].prefill(sequence)[0].argmax(-1)
    next_token = {name: next_token_agreement(path.prefill, sequence, expected) for name, path in paths.items()}
    print(f"\nQwen2-0.5B-shaped decoder, {layers} layers ({parameters / 1e6:.0f} M parameters, random weights), "
          f"batch 1, {PROMPT}-token prompt, {NEW_TOKENS} greedy tokens, 2 threads")
    print(f"{'path':<40}{'prefill ms':>11}{'ms/token':>10}{'tokens/s':>10}{'vs bf16':>9}{'weights MB':>12}"
          f"{'held MB':>9}{'decode MB':>10}{'= bf16':>8}{'next =':>8}  note")
    for name, result in results.items():
        path = paths[name]
        agreement = (result.tokens == reference.tokens).float().mean().item()
        print(f"{name:<40}{result.prefill_ms:>11.1f}{result.token_ms:>10.2f}{1e3 / result.token_ms:>10.2f}"
              f"{reference.token_ms / result.token_ms:>8.2f}x{path.weight_bytes / 2**20:>12.0f}{path.held_mb:>9.0f}"
              f"{result.peak_mb:>10.0f}{agreement:>8.3f}{next_token[name]:>8.3f}  {path.note}")


def ort_quantized(floats: Path, folder: Path, block: int) -> list[OnnxRuntimeProgram]:
    """The fp32 prefill and step files in ``floats`` quantized by ONNX Runtime's own
    ``MatMulNBitsQuantizer`` (4 bits, symmetric, blocks of ``block``, accuracy level 4), written
    into ``folder`` and opened on 2 threads."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    programs = []
    for name in ("prefill", "step"):
        quantizer = MatMulNBitsQuantizer(onnx.load(floats / f"{name}.onnx"), block_size=block, is_symmetric=True,
                                         accuracy_level=INT8_ACTIVATIONS)
        quantizer.process()
        quantizer.model.save_model_to_file(str(folder / f"{name}_ort.onnx"))
        programs.append(OnnxRuntimeProgram(folder / f"{name}_ort.onnx", threads=2))
    return programs


def ort_quantizer() -> None:
    """Our W4 export against ONNX Runtime's MatMulNBitsQuantizer on one smaller model (module doc)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = qwen2_config(8, 32768, tied=False)
    model = Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, PROMPT), generator=g)
    prompts = [torch.randint(0, config.vocab_size, (1, 32), generator=g) for _ in range(2)]
    # The linears only, as ORT's quantizer quantizes its MatMuls and leaves the embedding's Gather
    # float; both symmetric: ours with each group's clip chosen by MSE, theirs with the signed-max
    # scale (max / -8: all 16 codes, the extreme exact). Relative weight error on Gaussian groups
    # of 128: ours 0.0102, theirs 0.0107, ours by max / 7 0.0138.
    w4 = QConfig(by_op={"linear": OpQuantConfig(None, QuantSpec("int4", granularity=PerGroup(1, 128), observer="mse"))})
    with tempfile.TemporaryDirectory() as folder:
        ours, floats = Path(folder) / "ours", Path(folder) / "float"
        ours.mkdir()
        floats.mkdir()
        exported = qcompile.compile_decoder(model, prompts, calibration_steps=2, progress=False,
                                            qconfig=w4).export_onnx(ours, threads=2)
        qcompile.compile_decoder(model, prompts, calibration_steps=2, progress=False,
                                 qconfig=QConfig()).export_onnx(floats, threads=2)
        theirs = ort_quantized(floats, Path(folder), 128)
        everywhere = []
        for name in ("prefill", "step"):  # our files with int8 activations in every node, as ORT's quantizer writes them
            file = onnx.load(ours / f"{name}.onnx")
            set_accuracy_levels(file, {n.name: INT8_ACTIVATIONS for n in file.graph.node if n.op_type == "MatMulNBits"})
            onnx.save(file, ours / f"{name}_level4.onnx")
            everywhere.append(OnnxRuntimeProgram(ours / f"{name}_level4.onnx", threads=2))
        paths = {"fp32 (our export, nothing quantized)": (OnnxRuntimeProgram(floats / "prefill.onnx", 2),
                                                          OnnxRuntimeProgram(floats / "step.onnx", 2)),
                 "our W4 g128 export (levels measured)": (exported.prefill, exported.step),
                 "our W4 g128 export, level 4 everywhere": tuple(everywhere),
                 "ORT MatMulNBitsQuantizer, level 4": tuple(theirs)}
        results = {name: decode(prefill, step, ids) for name, (prefill, step) in paths.items()}
        reference = results["fp32 (our export, nothing quantized)"].tokens
        sequence = torch.cat([ids, reference], 1)
        expected = paths["fp32 (our export, nothing quantized)"][0](sequence)[0].argmax(-1)
        next_token = {name: next_token_agreement(prefill, sequence, expected) for name, (prefill, _) in paths.items()}
    levels = [level.level for level in exported.step_export.check.accuracy_levels]
    print(f"\nQwen2-shaped decoder, 8 layers, 32,768-token vocabulary (178 M parameters, random weights), in ONNX "
          f"Runtime, batch 1, {PROMPT}-token prompt, {NEW_TOKENS} greedy tokens, 2 threads; our file has level 4 on "
          f"{levels.count(INT8_ACTIVATIONS)} of {len(levels)} step nodes")
    print(f"{'path':<40}{'prefill ms':>11}{'ms/token':>10}{'= fp32':>8}{'next =':>8}")
    for name, result in results.items():
        print(f"{name:<40}{result.prefill_ms:>11.1f}{result.token_ms:>10.2f}"
              f"{(result.tokens == reference).float().mean().item():>8.3f}{next_token[name]:>8.3f}")


def ort_quantizer_trained() -> None:
    """Fidelity of our W4 file against ORT's quantizer on a model whose tokens mean something:
    the tiny decoder trained in ``tests.models`` (2 layers, width 128), groups of 32 for both,
    greedy tokens against the fp32 file over 64 held-out prompts."""
    from tests.models import train_tiny_decoder

    torch.set_num_threads(2)
    decoder = train_tiny_decoder()
    batches = [torch.stack(decoder.held_out[i:i + 4]) for i in range(0, 80, 4)]
    calibration, evaluation = batches[:4], batches[4:]
    formats = {"our W4 g32, symmetric": QuantSpec("int4", granularity=PerGroup(1, 32)),
               "our W4 g32, symmetric, clip by MSE": QuantSpec("int4", granularity=PerGroup(1, 32), observer="mse"),
               "our W4 g32, affine, clip by MSE": QuantSpec("int4", False, PerGroup(1, 32), "mse")}
    with tempfile.TemporaryDirectory() as folder:
        floats = Path(folder) / "float"
        floats.mkdir()
        reference = qcompile.compile_decoder(decoder.model, calibration, progress=False,
                                             qconfig=QConfig()).export_onnx(floats, threads=2)
        paths = {}
        for name, spec in formats.items():
            ours = Path(folder) / name.replace(" ", "_").replace(",", "")
            ours.mkdir()
            paths[name] = qcompile.compile_decoder(decoder.model, calibration, progress=False, qconfig=QConfig(
                by_op={"linear": OpQuantConfig(None, spec)})).export_onnx(ours, threads=2)
        paths["ORT MatMulNBitsQuantizer g32, level 4"] = OnnxDecoder(*ort_quantized(floats, Path(folder), 32),
                                                                     None, None)  # no export of ours
        expected = [reference.generate(batch, 32) for batch in evaluation]
        logits = [reference.prefill(sequence)[0].double() for sequence in expected]
        print(f"\ntrained tiny decoder (tests.models), in ONNX Runtime, {4 * len(evaluation)} held-out prompts, "
              f"32 greedy tokens, against the fp32 file; logit SQNR and next-token agreement along fp32's tokens")
        print(f"{'path':<40}{'prompts = fp32':>15}{'tokens = fp32':>15}{'logit SQNR':>12}{'next =':>8}  levels")
        for name, path in paths.items():
            produced = [path.generate(batch, 32) for batch in evaluation]
            prompts = sum(torch.equal(a, e) for p, x in zip(produced, expected) for a, e in zip(p, x))
            tokens = torch.cat([(p == x).float().flatten() for p, x in zip(produced, expected)]).mean().item()
            forced = [path.prefill(sequence)[0].double() for sequence in expected]
            noise = sum(float((f - r).square().sum()) for f, r in zip(forced, logits, strict=True))
            sqnr = 10 * math.log10(sum(float(r.square().sum()) for r in logits) / noise)
            following = torch.cat([(f.argmax(-1) == r.argmax(-1)).flatten() for f, r in zip(forced, logits)])
            levels = ("" if path.step_export is None else
                      f"level 4 on {sum(lv.level == INT8_ACTIVATIONS for lv in path.step_export.check.accuracy_levels)}"
                      f" of {len(path.step_export.check.accuracy_levels)}")
            print(f"{name:<40}{prompts:>15}{tokens:>15.3f}{sqnr:>9.2f} dB{following.float().mean().item():>8.3f}  "
                  f"{levels}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["ort-quantizer"]:
        ort_quantizer()
        ort_quantizer_trained()
    elif sys.argv[1:2] == ["--layers"]:
        main(int(sys.argv[2]))
    else:
        main()
