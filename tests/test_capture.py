"""Capture: torch.export non-strict, dynamic batch, clear errors for what cannot be captured."""

import pytest
import torch
from torch import nn

import qcompile


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_minilm_captures_with_dynamic_batch(minilm, minilm_example):
    model, _ = minilm
    gm = qcompile.capture(model, kwargs=minilm_example)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.target for n in inputs] == ["input_ids", "attention_mask"]
    assert all(isinstance(n.meta["val"].shape[0], torch.SymInt) for n in inputs)
    bigger = {k: torch.cat([v, v, v]) for k, v in minilm_example.items()}
    with torch.no_grad():
        expected = model(**bigger).last_hidden_state
        actual = gm(**bigger).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_resnet18_captures_and_matches_eager(resnet, image_batch):
    gm = qcompile.capture(resnet, (image_batch,))
    convs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 20
    with torch.no_grad():
        torch.testing.assert_close(gm(image_batch), resnet(image_batch))


def test_uncapturable_model_names_module_and_line():
    with pytest.raises(qcompile.CaptureError) as info:
        qcompile.capture(DataDependent(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "module 'gate' (Gate)" in message
    assert "test_capture.py:" in message
    assert "if x.sum() > 0" in message


def test_batch_of_one_is_captured_static_with_a_warning():
    with pytest.warns(UserWarning, match="input 'input'.*static at 1"):
        gm = qcompile.capture(nn.Linear(3, 2), (torch.randn(1, 3),))
    assert gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0] == 1


def test_inputs_that_do_not_fit_forward_are_named():
    with pytest.raises(qcompile.CaptureError, match="do not fit Linear.forward"):
        qcompile.capture(nn.Linear(3, 2), (torch.randn(2, 3), torch.randn(2, 3)))


class KeywordsOnly(nn.Module):
    """A forward of ``**kwargs``: torch.export cannot take dynamic shapes for it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, **inputs):
        return self.proj(inputs["x"])


def test_a_forward_export_cannot_capture_dynamically_is_captured_static_with_a_warning():
    with pytest.warns(UserWarning, match="captured with static shapes.*accepts the example's sizes only"):
        gm = qcompile.capture(KeywordsOnly(), kwargs={"x": torch.randn(2, 4)})
    assert list(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape) == [2, 4]
