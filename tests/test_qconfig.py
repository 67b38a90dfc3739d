"""QConfig resolution: the most specific rule wins; None keeps float."""

import re

import pytest
import torch
from torch import nn

import qcompile
from qcompile.qconfig import OpQuantConfig, QConfig, int8_preset, op_kind
from qcompile.spec import QuantSpec

A = OpQuantConfig(QuantSpec("uint8", symmetric=False))
B = OpQuantConfig(QuantSpec("int8"))
C = OpQuantConfig(QuantSpec("int8", observer="mse"))


@pytest.fixture(scope="module")
def minilm_linears(minilm, minilm_example):
    gm = qcompile.capture(minilm[0], kwargs=minilm_example)
    linears = [n for n in gm.graph.nodes if op_kind(n) == "linear"]
    return {qcompile.source_module(n)[0]: n for n in linears}


def test_op_kind_names():
    gm = qcompile.capture(nn.Linear(2, 2), (torch.randn(2, 2),))
    assert [op_kind(n) for n in gm.graph.nodes if n.op == "call_function"] == ["linear"]


def test_specificity_order(minilm_linears):
    query = minilm_linears["encoder.layer.0.attention.self.query"]
    config = QConfig(default=A).set_op("linear", B)
    assert config.resolve(query) == (B, "op kind 'linear'")
    config = config.set_module_type(nn.Linear, C)
    assert config.resolve(query) == (C, "module type torch.nn.modules.linear.Linear of 'encoder.layer.0.attention.self.query'")
    config = config.set_module_regex(r"encoder\.layer\.0\..*", A)
    assert config.resolve(query)[1] == r"module regex 'encoder\.layer\.0\..*' on 'encoder.layer.0.attention.self.query'"
    config = config.set_module_name("encoder.layer.0", B)
    assert config.resolve(query) == (B, "module name 'encoder.layer.0'")
    config = config.set_module_name("encoder.layer.0.attention.self.query", None)
    assert config.resolve(query) == (None, "module name 'encoder.layer.0.attention.self.query'")
    # Another layer-0 linear still gets the layer rule; a layer-1 linear the type rule.
    assert config.resolve(minilm_linears["encoder.layer.0.attention.self.key"])[0] == B
    assert config.resolve(minilm_linears["encoder.layer.1.attention.self.key"])[0] == C


def test_module_type_by_short_name_and_default_none(minilm_linears):
    pooler = minilm_linears["pooler.dense"]
    assert QConfig().resolve(pooler) == (None, "default")
    assert QConfig().set_module_type("BertPooler", A).resolve(pooler) == (A, "module type BertPooler of 'pooler'")


def test_bad_regex_fails_when_set():
    with pytest.raises(re.error):
        QConfig().set_module_regex("encoder.(", A)


def test_int8_preset_covers_matmul_like_ops_only(minilm_linears):
    preset = int8_preset()
    config, why = preset.resolve(minilm_linears["encoder.layer.3.output.dense"])
    assert why == "op kind 'linear'"
    assert str(config.activation) == "uint8/affine/per-tensor/minmax"
    assert str(config.weight) == "int8/sym/per-channel(0)/minmax"
