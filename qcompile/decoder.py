"""Decoder language models with a KV cache: a compiled prefill, a compiled decode step, and
the greedy loop that runs them.

A causal LM serves text in two programs. *Prefill* reads the prompt and returns the logits and
the cache, a key and a value tensor per layer, [batch, kv heads, positions, head dim]. A *decode
step* reads one new token and the cache and returns that token's logits and the cache one
position longer. Each is captured as a plain-tensor program (:class:`PrefillProgram`,
:class:`StepProgram` unpack and rebuild transformers' ``DynamicCache`` around the model, so
export sees tensors only) and compiled like any model: the cache's length, the prompt's length
and the batch are dynamic dimensions, the rotary embeddings, RMSNorm, the causal mask and
grouped-query attention run in the float part, the projections and MLPs in int8.

Calibration follows use: prefill is calibrated on the prompts; the step on the tokens and caches
the float model itself produces while decoding those prompts greedily for
``calibration_steps`` tokens, so each cache length the step is calibrated on is one it meets.
Outlier smoothing is measured once, by the step (the program that produces every generated
token), and the prefill applies the step's channels (``outlier_smoothing=step.smoothing``):
smoothing changes the weights, and two programs smoothed apart would quantize the same linear
two ways and hold both. Measured on the tiny trained decoder (16 held-out prompts, 32 tokens):
smoothing apart 13 prompts decoded as fp32 and 89.8 % of tokens; by the prefill's measurement
9 and 88.0 %; by the step's 14 and 93.1 %.
The float model and the compiled one decode with the same loop (:func:`greedy_decode`), which
is how their tokens are compared; so does ONNX Runtime, once both programs are exported
(:meth:`QuantizedDecoder.export_onnx`, target ``onnx-qdq``). Prompts in one batch share a length (no padding mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcompile.api import QuantizedModel, compile
from qcompile.capture import eval_mode
from qcompile.errors import QCompileError
from qcompile.mixed_precision import module_qconfig
from qcompile.targets import Target, get_target

Program = Callable[..., Sequence[Tensor]]
# compile's options for a precision search, which the prefill (replaying the step's formats) does not take
BUDGET_OPTIONS = ("accuracy_budget", "metric", "objective", "candidates")


def _flat_cache(cache: Any) -> list[Tensor]:
    """keys and values, layer by layer: [k0, v0, k1, v1, ...]."""
    flat = []
    for layer in cache.layers:
        flat += [layer.keys, layer.values]
    return flat


class PrefillProgram(nn.Module):
    """``model(input_ids, use_cache=True)`` as tensors: (logits, k0, v0, k1, v1, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.training = False  # the wrapper's own flag; the model's flags stay the user's
        self.model = model

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids=input_ids, use_cache=True)
        return (out.logits, *_flat_cache(out.past_key_values))


class StepProgram(nn.Module):
    """One decode step as tensors: (input_ids [batch, 1], k0, v0, ...) -> (logits, k0', v0', ...),
    each cache tensor one position longer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.training = False
        self.model = model

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache  # a transformers model is what this wraps

        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return (out.logits, *_flat_cache(out.past_key_values))


def decode_steps(prefill: Program, step: Program, input_ids: Tensor, new_tokens: int) -> Iterator[tuple[Tensor, ...]]:
    """The greedy loop: prefill once, then for each new token yield the step's inputs (the token
    and the cache) and run the step, the cache growing by one position each time."""
    with torch.no_grad():
        logits, *cache = prefill(input_ids)
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            yield (token, *cache)
            logits, *cache = step(token, *cache)


def greedy_decode(prefill: Program, step: Program, input_ids: Tensor, new_tokens: int) -> Tensor:
    """The prompt followed by ``new_tokens`` greedy tokens."""
    tokens = [inputs[0] for inputs in decode_steps(prefill, step, input_ids, new_tokens)]
    return torch.cat([input_ids, *tokens], dim=1)


def _step_batches(prefill: Program, step: Program, prompts: Iterable[Tensor], steps: int) -> list[tuple[Tensor, ...]]:
    """The (token, cache) inputs the step meets while the float model decodes each prompt."""
    return [inputs for prompt in prompts for inputs in decode_steps(prefill, step, prompt, steps)]


@dataclass
class QuantizedDecoder:
    """A compiled causal LM: ``prefill`` and ``step`` are compiled models with reports of their own."""

    prefill: QuantizedModel
    step: QuantizedModel

    def generate(self, input_ids: Tensor, new_tokens: int) -> Tensor:
        """Greedy decoding, as :func:`greedy_decode` does with the float model."""
        return greedy_decode(self.prefill, self.step, input_ids, new_tokens)

    def export_onnx(self, folder: str | Path, *, threads: int | None = None, **options: Any) -> OnnxDecoder:
        """Write ``prefill.onnx`` and ``step.onnx`` into ``folder`` (each cross-checked in ONNX
        Runtime, see :meth:`QuantizedModel.export_onnx`; batch, prompt and cache lengths stay
        dynamic) and return the decoder that runs them in ONNX Runtime (on ``threads`` intra-op
        threads, ONNX Runtime's default when None)."""
        from qcompile.targets.onnx_qdq.runtime import OnnxRuntimeProgram  # onnxruntime loads only here

        folder = Path(folder)
        if not folder.is_dir():
            raise QCompileError(f"export_onnx: '{folder}' is not a folder")
        exports = {name: getattr(self, name).export_onnx(folder / f"{name}.onnx", **options)
                   for name in ("prefill", "step")}
        return OnnxDecoder(OnnxRuntimeProgram(exports["prefill"].path, threads),
                           OnnxRuntimeProgram(exports["step"].path, threads), exports["prefill"], exports["step"])


@dataclass
class OnnxDecoder:
    """A causal LM as two ONNX files run by ONNX Runtime, with the same greedy loop."""

    prefill: Program
    step: Program
    prefill_export: Any  # what each export wrote and how its cross-check went (OnnxExport)
    step_export: Any

    def generate(self, input_ids: Tensor, new_tokens: int) -> Tensor:
        return greedy_decode(self.prefill, self.step, input_ids, new_tokens)


def compile_decoder(model: nn.Module, prompts: Iterable[Tensor], *, calibration_steps: int = 8,
                    eval_prompts: Iterable[Tensor] | None = None, **options: Any) -> QuantizedDecoder:
    """Compile a transformers causal LM (``model(input_ids, past_key_values=..., use_cache=True)``)
    into a prefill and a decode step (see the module docstring); ``prompts`` are batches of token
    ids [batch, length], ``options`` go to :func:`qcompile.compile` for both programs.

    With ``accuracy_budget`` the step is searched (:mod:`qcompile.mixed_precision`; its metric is
    read on the step's outputs, the next token's logits and the cache, over the steps the float
    model decodes from ``eval_prompts``, default the prompts) and the prefill replays the step's
    formats by module name, as it replays the step's smoothing: one format per linear."""
    prompts = [p for p in prompts]
    if not prompts or not all(isinstance(p, Tensor) and p.dim() == 2 for p in prompts):
        raise QCompileError("compile_decoder needs prompts: a non-empty list of token id tensors [batch, length]")
    if calibration_steps < 2:
        raise QCompileError("calibration_steps must be at least 2 (the step is calibrated on growing caches)")
    if "eval_data" in options:
        raise QCompileError("compile_decoder takes eval_prompts (token ids), not eval_data: the step's evaluation "
                            "batches are decoded from them")
    prefill, step = PrefillProgram(model), StepProgram(model)
    step_options = dict(options)
    with eval_mode(model):
        step_data = _step_batches(prefill, step, prompts, calibration_steps)
        if options.get("accuracy_budget") is not None and eval_prompts is not None:
            step_options["eval_data"] = _step_batches(prefill, step, list(eval_prompts), calibration_steps)
    compiled_step = compile(step, calibration_data=step_data, **step_options)
    if compiled_step.smoothing is not None:
        options = {**options, "outlier_smoothing": compiled_step.smoothing}
    if options.get("accuracy_budget") is not None:
        target = options.get("target", "cpu-int8")
        qconfig = module_qconfig(compiled_step.report, target if isinstance(target, Target) else get_target(target),
                                 options.get("candidates"))
        options = {k: v for k, v in options.items() if k not in BUDGET_OPTIONS} | {"qconfig": qconfig}
    compiled = QuantizedDecoder(compile(prefill, calibration_data=prompts, **options), compiled_step)
    shared = share_equal_tensors(compiled.prefill, compiled.step)
    compiled.step.report.notes.append(f"{shared / 2**20:.1f} MB of tensors shared with the prefill program")
    return compiled


def share_equal_tensors(source: nn.Module, target: nn.Module) -> int:
    """Point ``target``'s buffers at ``source``'s where the values are equal (the int8 weights,
    their scales and biases: weight quantization reads the weights only, so both programs make
    the same ones); returns the bytes no longer held twice. Packed oneDNN weights are cached per
    tensor, so the step also reuses the prefill's packing."""
    by_key: dict[tuple, list[Tensor]] = {}
    for tensor in source.buffers():
        by_key.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(tensor)
    saved = 0
    for module in target.modules():
        for name, tensor in list(module._buffers.items()):
            if tensor is None:
                continue
            same = next((t for t in by_key.get((tensor.dtype, tuple(tensor.shape)), [])
                         if t is not tensor and torch.equal(t, tensor)), None)
            if same is not None:
                module._buffers[name] = same
                saved += tensor.numel() * tensor.element_size()
    return saved
