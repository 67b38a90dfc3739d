"""The model a user compiles is never changed: parameters, buffers its forward writes, Python
attributes its forward sets, flags. The compiled model keeps state of its own."""

import torch
from torch import nn

import qcompile


class Stateful(nn.Module):
    """Every kind of state a forward can touch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(8))
        self.steps = 0
        self.seen = []

    def forward(self, x):
        self.calls.add_(1)
        self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        self.steps += 1
        self.seen.append(tuple(x.shape))
        return self.fc(x) + self.ema


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {p: p.requires_grad for p in model.parameters()}, model.steps, list(model.seen), model.training)


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 8, generator=g),) for _ in range(3)]


def assert_unchanged(model, before):
    state, grads, steps, seen, training = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {p: p.requires_grad for p in model.parameters()} == grads
    assert (model.steps, model.seen, model.training) == (steps, seen, training)


def test_compiling_and_running_never_writes_the_users_buffers_or_attributes():
    model = Stateful().train()
    before = snapshot(model)
    qm = qcompile.compile(model, calibration_data=data(), progress=False)
    assert_unchanged(model, before)
    qm(data()[0][0])
    assert_unchanged(model, before)


def test_dynamic_compile_and_save_leave_the_model_as_it_was(tmp_path):
    model = Stateful().eval()
    before = snapshot(model)
    qm = qcompile.compile(model, (data()[0][0],))
    qm.save(tmp_path / "m.qc")
    assert_unchanged(model, before)


def test_the_compiled_model_starts_from_the_users_state_and_keeps_its_own():
    model = Stateful().eval()
    qm = qcompile.compile(model, calibration_data=data(), progress=False)
    calls = dict(qm.graph_module.named_buffers())["calls"]
    assert float(calls) == 0  # calibration and compile-time checks ran on it, then it was reset
    x = data()[1][0]
    expected = model(x)  # the user's model advances its own state once
    assert torch.allclose(qm(x), expected, atol=0.1)
    assert float(calls) == 1 and float(model.calls) == 1
