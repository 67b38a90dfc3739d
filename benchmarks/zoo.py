"""The architecture zoo: does every mainstream architecture compile, keep its answers and run faster?

Each row is a model built from a transformers config (random weights, BatchNorm statistics set
from data by running it in train mode over a few batches) or a plain torch module, compiled for
cpu-int8 on 4 calibration batches, and measured in this run (2 threads, median of 5 calls):

* cosine of the compiled model's output against fp32 on fresh inputs of another batch size (and,
  for text, another sequence length), the worst row of the batch; next to it the same cosine for
  bf16 eager, the model's own noise floor: a deep network with random weights can be chaotic
  (it amplifies any rounding, bf16's too, layer by layer), and then no precision below fp32 keeps
  its output, which says nothing about quantization (with BatchNorm statistics from data,
  ResNet-50 gives 0.84 in bf16 and 0.80 under input noise 40 dB down);
* latency against fp32 eager and bf16 eager on those inputs;
* the int8 share of weight ops (every op with weights is in the report, int8 or float with a reason);
* the ONNX QDQ export (the model compiled for target onnx-qdq on the same data), cross-checked in
  ONNX Runtime: its int8 kernels against the float Conv/MatMul/Gemm/GRU/LSTM ONNX Runtime still runs.

Configs are reduced (4 layers, width 256, 128 tokens; images 3x128x128) so that the whole table
runs in minutes; run ``python -m benchmarks.zoo [name ...]`` for some rows only.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as hf

import qcompile
from benchmarks.timing import median_ms
from qcompile.targets.onnx_qdq.check import FLOAT_COMPUTE
from tests.models import TinyConvNet, resnet18

TEXT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=8000,
            max_position_embeddings=512)
DECODER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768, vocab_size=8000,
               max_position_embeddings=512)
VISION = dict(image_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              patch_size=16)


def main_output(out: Any) -> torch.Tensor:
    """The model's main tensor output (logits, last hidden state, pooled features)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


class TextOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(input_ids=input_ids, attention_mask=attention_mask))


class DecoderOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(input_ids=input_ids, use_cache=False))


class ImageOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(pixel_values))


def text(cls: Any, config: Any) -> tuple[torch.nn.Module, Callable[[int, int, int], dict]]:
    def inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(5, 8000, (batch, length), generator=g),
                "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return TextOutput(cls(config)), inputs


def decoder(cls: Any, config: Any) -> tuple[torch.nn.Module, Callable[[int, int, int], dict]]:
    def inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(5, 8000, (batch, length), generator=g)}
    return DecoderOutput(cls(config)), inputs


def image(model: torch.nn.Module, channels: int = 3, size: int = 128) -> tuple[torch.nn.Module, Callable]:
    def inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, channels, size, size, generator=g),)
    return ImageOutput(model), inputs


def audio(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable]:
    def inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 4, 64, generator=torch.Generator().manual_seed(seed)),)
    return model, inputs


def _cnn_config(cls: Any, **extra: Any) -> Any:
    return cls(num_channels=3, **extra)


ZOO: dict[str, Callable[[], tuple[torch.nn.Module, Callable]]] = {
    "bert": lambda: text(hf.BertModel, hf.BertConfig(**TEXT)),
    "roberta": lambda: text(hf.RobertaModel, hf.RobertaConfig(**TEXT)),
    "distilbert": lambda: text(hf.DistilBertModel, hf.DistilBertConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=1024,
                                                                        vocab_size=8000)),
    "albert": lambda: text(hf.AlbertModel, hf.AlbertConfig(**TEXT, embedding_size=128)),
    "electra": lambda: text(hf.ElectraModel, hf.ElectraConfig(**TEXT)),
    "mpnet": lambda: text(hf.MPNetModel, hf.MPNetConfig(**TEXT)),
    "t5-encoder": lambda: text(hf.T5EncoderModel, hf.T5Config(d_model=256, d_ff=1024, num_layers=4, num_heads=4,
                                                              vocab_size=8000, d_kv=64)),
    "gpt2": lambda: decoder(hf.GPT2LMHeadModel, hf.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8000,
                                                             n_positions=512)),
    "llama": lambda: decoder(hf.LlamaForCausalLM, hf.LlamaConfig(**DECODER, num_key_value_heads=2)),
    "qwen2": lambda: decoder(hf.Qwen2ForCausalLM, hf.Qwen2Config(**DECODER, num_key_value_heads=2)),
    "mistral": lambda: decoder(hf.MistralForCausalLM, hf.MistralConfig(**DECODER, num_key_value_heads=2)),
    "phi": lambda: decoder(hf.PhiForCausalLM, hf.PhiConfig(**DECODER)),
    "opt": lambda: decoder(hf.OPTForCausalLM, hf.OPTConfig(hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                                                          num_attention_heads=4, vocab_size=8000,
                                                          max_position_embeddings=512, word_embed_proj_dim=256)),
    "vit": lambda: image(hf.ViTModel(hf.ViTConfig(**VISION))),
    "deit": lambda: image(hf.DeiTModel(hf.DeiTConfig(**VISION))),
    "beit": lambda: image(hf.BeitModel(hf.BeitConfig(**VISION))),
    "convnext": lambda: image(hf.ConvNextModel(hf.ConvNextConfig(hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 4, 2]))),
    "resnet-50": lambda: image(hf.ResNetModel(hf.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3]))),
    "regnet": lambda: image(hf.RegNetModel(hf.RegNetConfig())),
    "mobilenet-v2": lambda: image(hf.MobileNetV2Model(hf.MobileNetV2Config(image_size=128))),
    "efficientnet": lambda: image(hf.EfficientNetModel(hf.EfficientNetConfig(image_size=128))),
    "resnet-18 (torch)": lambda: image(resnet18()),
    "small cnn (torch)": lambda: image(TinyConvNet(), channels=1, size=8),
    "conv1d + rnn (torch)": lambda: audio(AudioTagger()),
}


class AudioTagger(torch.nn.Module):
    """conv1d front end -> GRU -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 64, 5, padding=2)
        self.gru = torch.nn.GRU(64, 64, batch_first=True)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(h[:, -1])


@dataclass
class Row:
    name: str
    compiled: str = ""
    cosine: float | None = None
    bf16_cosine: float | None = None
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    int8_ms: float | None = None
    weight_ops: str = ""
    onnx: str = ""


def set_batchnorm_statistics(model: torch.nn.Module, batches: list[Any], call: Callable) -> None:
    """Running statistics from data, as a trained network has (random-init statistics of 0 and 1
    make deep BN-free activations vanish or explode), and the affine parameters at PyTorch's
    defaults γ = 1, β = 0: transformers' initializer draws γ from N(0, 0.02²), which shrinks
    every BatchNorm's output fiftyfold (EfficientNet's output fell to 1e-28)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        if m.affine:
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    with torch.no_grad():
        for batch in batches:
            call(model, batch)
    model.eval()


def run(model: Any, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def measure(name: str, build: Callable) -> Row:
    row = Row(name)
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    calibration = [inputs(8, 128, seed) for seed in range(4)]
    set_batchnorm_statistics(model, calibration, run)
    fresh = inputs(6, 96, 100)
    start = time.perf_counter()
    try:
        qm = qcompile.compile(model, calibration_data=calibration, progress=False)
    except Exception as exc:
        row.compiled = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        traceback.print_exc()
        return row
    row.compiled = f"{time.perf_counter() - start:.0f} s"
    with torch.no_grad():
        expected, actual = run(model, fresh), run(qm, fresh)
    row.cosine = worst_cosine(actual, expected)
    bf16 = _bf16(model)
    if bf16 is not None:
        with torch.no_grad():
            row.bf16_cosine = worst_cosine(run(bf16, _bf16_inputs(fresh)), expected)
    row.fp32_ms = median_ms(lambda: run(model, fresh), 5)
    row.bf16_ms = median_ms(lambda: run(bf16, _bf16_inputs(fresh)), 5) if bf16 is not None else None
    row.int8_ms = median_ms(lambda: run(qm, fresh), 5)
    precisions = [n.precision for n in qm.report.nodes]
    row.weight_ops = f"{precisions.count('int8')}/{len(precisions)}"
    with tempfile.TemporaryDirectory() as folder:
        try:  # the target made for ONNX Runtime, on the same data
            onnx_qdq = qcompile.compile(model, target="onnx-qdq", calibration_data=calibration, progress=False)
            exported = onnx_qdq.export_onnx(Path(folder) / "m.onnx")
            ops = exported.check.ort_ops
            floats = sum(n for op, n in ops.items() if op in FLOAT_COMPUTE)
            row.onnx = f"{sum(exported.check.int8_kernels.values())} int8 / {floats} float"
        except Exception as exc:
            row.onnx = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return row


def worst_cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The lowest cosine between a row of ``actual`` and the same row of ``expected``."""
    return float(torch.nn.functional.cosine_similarity(actual.flatten(1).float(), expected.flatten(1).float()).min())


def _bf16(model: torch.nn.Module) -> torch.nn.Module | None:
    import copy

    try:
        return copy.deepcopy(model).to(torch.bfloat16)
    except Exception:
        return None


def _bf16_inputs(batch: Any) -> Any:
    def cast(t: Any) -> Any:
        return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return {k: cast(v) for k, v in batch.items()} if isinstance(batch, dict) else tuple(cast(t) for t in batch)


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    rows = [measure(name, ZOO[name]) for name in (names or ZOO)]
    print(f"\n{'model':<22}{'compile':<10}{'cosine':>8}{'bf16 cos':>9}{'fp32 ms':>9}{'bf16 ms':>9}{'int8 ms':>9}"
          f"{'vs fp32':>9}{'vs bf16':>9}  {'int8 weight ops':<16}ONNX Runtime")
    for r in rows:
        if r.cosine is None:
            print(f"{r.name:<22}{r.compiled}")
            continue
        bf16 = f"{r.bf16_ms:9.1f}" if r.bf16_ms else f"{'-':>9}"
        floor = f"{r.bf16_cosine:9.4f}" if r.bf16_cosine is not None else f"{'-':>9}"
        vs_bf16 = f"{r.bf16_ms / r.int8_ms:8.2f}x" if r.bf16_ms else f"{'-':>9}"
        print(f"{r.name:<22}{r.compiled:<10}{r.cosine:8.4f}{floor}{r.fp32_ms:9.1f}{bf16}{r.int8_ms:9.1f}"
              f"{r.fp32_ms / r.int8_ms:8.2f}x{vs_bf16}  {r.weight_ops:<16}{r.onnx}")


if __name__ == "__main__":
    main(sys.argv[1:])
