"""Quantization-aware training on scikit-learn's digits: fp32, PTQ and QAT at W8A8 and W4A8.

    python -m examples.qat_digits

A small CNN (conv-BN-ReLU twice, max-pool, dropout, linear) is trained in float, then
quantized two ways with the same QConfig (8-bit uint8 activations, int8 or int4 per-channel
weights): post-training (``qcompile.compile``) and quantization-aware (``prepare_qat``, a few
epochs of one's own training loop with cross-entropy plus distillation from the float model,
BatchNorm frozen for the last epoch, then ``convert_qat``). Both run on the cpu-int8 kernels;
the int4 weights are int8 values in [-8, 7].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import qcompile
from qcompile import Distillation, OpQuantConfig, PerChannel, QConfig, QuantSpec
from qcompile.passes import PruneWeights


class DigitsCNN(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.dropout(torch.flatten(x, 1)))


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def batches(self, size: int = 64, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        return [(self.x_train[i], self.y_train[i]) for i in order.split(size)]

    def calibration(self, count: int = 8) -> list[tuple[Tensor]]:
        return [(x,) for x, _ in self.batches()[:count]]


def digits() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
        x.numpy(), y.numpy(), test_size=0.25, random_state=0))
    return Digits(x_train, y_train, x_test, y_test)


def accuracy(model: Callable[[Tensor], Tensor], data: Digits) -> float:
    """Top-1 on the held-out quarter, in percent."""
    if isinstance(model, nn.Module):
        model.eval()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item() * 100


def train_float(data: Digits, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    model = DigitsCNN(seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for x, y in data.batches(seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def w_a8(bits: int) -> QConfig:
    """uint8 activations, ``bits``-bit symmetric per-channel weights, for conv2d and linear."""
    weight = QuantSpec(f"int{bits}", symmetric=True, granularity=PerChannel(0))
    config = OpQuantConfig(QuantSpec("uint8", symmetric=False), weight)
    return QConfig(by_op={"conv2d": config, "linear": config})


def qat(model: nn.Module, data: Digits, qconfig: QConfig, epochs: int = 4, lr: float = 3e-4,
        target: str = "cpu-int8", prune: PruneWeights | None = None) -> qcompile.QatModel:
    """``epochs`` of QAT: cross-entropy on the labels plus KL distillation from ``model``,
    BatchNorm frozen for the last epoch; weights pruned by ``prune`` first, if given."""
    prepared = qcompile.prepare_qat(model, calibration_data=data.calibration(), qconfig=qconfig, target=target,
                                    progress=False, prune=prune)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=lr)
    with Distillation(prepared, model, output_loss="kl", temperature=2.0) as distill:
        for epoch in range(epochs):
            if epoch == epochs - 1:
                prepared.freeze_batchnorm()
            for x, y in data.batches(seed=100 + epoch):
                distillation, logits = distill(x)
                loss = F.cross_entropy(logits, y) + distillation
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return prepared.eval()


def main() -> None:
    torch.set_num_threads(2)
    data = digits()
    model = train_float(data)
    print(f"fp32: top-1 {accuracy(model, data):.2f} %")
    for bits in (8, 4):
        qconfig = w_a8(bits)
        ptq = qcompile.compile(model, calibration_data=data.calibration(), qconfig=qconfig, outlier_smoothing=None,
                               progress=False)
        trained = qat(model, data, qconfig)
        lowered = qcompile.convert_qat(trained)
        print(f"W{bits}A8  PTQ top-1 {accuracy(ptq, data):.2f} %   QAT (fake-quant) {accuracy(trained, data):.2f} %   "
              f"QAT lowered to {lowered.report.target} {accuracy(lowered, data):.2f} %")


if __name__ == "__main__":
    main()
