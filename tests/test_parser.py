"""Literal IR: the canonical text parses back to the graph it describes, and pass tests start
from it (text in -> the pass under its contract -> the text out, outputs held where the pass
claims to preserve them)."""

import re

import pytest
import torch
from qcompile.passes import Canonicalize, EliminateDeadCode, EliminateDequant, FoldBatchNorm

import qcompile
from qcompile.ir.graph import named_tensors
from qcompile.ir.parser import IRParseError, example_inputs, parse_graph
from qcompile.testing import assert_outputs_close, assert_rewrites
from tests.models import TinyBlock, TinyConvNet
from tests.quant_stages import cleaned, qdq

_META = re.compile(r"  \{qc\..*\}$", re.M)


def _lowered(model, x):
    return qcompile.PassManager(qcompile.get_target("cpu-int8").lower, initial_properties={"qdq"})(
        qdq(model, x)).graph_module


@pytest.mark.parametrize("stage", ["float", "conv", "qdq", "lowered"])
def test_printed_stage_graphs_parse_back_to_the_same_text_and_outputs(stage):
    x, image = torch.randn(4, 16), torch.randn(2, 1, 8, 8)
    gm, inputs = {
        "float": lambda: (cleaned(TinyBlock(), x), (x,)),
        "conv": lambda: (cleaned(TinyConvNet(), image), (image,)),
        "qdq": lambda: (qdq(TinyBlock(), x), (x,)),
        "lowered": lambda: (_lowered(TinyBlock(), x), (x,)),
    }[stage]()
    text = _META.sub("", qcompile.print_graph(gm))
    # The symbols of the first input's type take that input's sizes: f32[s0,1,s1,s2] and (2, 1, 8, 8).
    dims = re.search(r"\[(.*?)\]", text.splitlines()[0])[1].split(",")
    sizes = {d: size for d, size in zip(dims, inputs[0].shape) if d.startswith("s")}
    parsed = parse_graph(text, constants=dict(named_tensors(gm)), sizes=sizes)
    static = qcompile.print_graph(parsed)  # a parsed graph is static: its sizes are the numbers given

    def numbers(line: str) -> str:
        head, sep, kind = line.partition(" : ")
        return head + sep + re.sub(r"\[([^\]]+)\]", lambda m: "[" + ",".join(
            str(eval(d, {}, dict(sizes))) for d in m[1].split(",")) + "]", kind)

    assert static.splitlines() == [numbers(line) for line in text.splitlines()]
    assert_outputs_close(gm, parsed, inputs, rtol=0.0)


def test_bad_literal_ir_names_the_line_and_never_evaluates_text():
    with pytest.raises(IRParseError, match=r"line 3 .*declared type f32\[4,9\], but the op computes f32\[4,8\]"):
        parse_graph("""
            %x = input x : f32[4,8]
            %r = aten.relu.default(%x) : f32[4,9]
            return (%r,)
        """)
    with pytest.raises(IRParseError, match="%y is used before it is defined"):
        parse_graph("%x = input x : f32[2]\n%r = aten.add.Tensor(%x, %y) : f32[2]\nreturn (%r,)")
    with pytest.raises(IRParseError, match="no operator aten.frobnicate.default"):
        parse_graph("%x = input x : f32[2]\n%r = aten.frobnicate.default(%x) : f32[2]\nreturn (%r,)")
    with pytest.raises(IRParseError, match="not an operator overload"):
        parse_graph("%x = input x : f32[2]\n%r = builtins.eval('1') : f32[2]\nreturn (%r,)")
    with pytest.raises(IRParseError, match=r"'__import__\('os'\)' is not a literal or a value"):
        parse_graph("%x = input x : f32[2]\n%r = aten.add.Tensor(%x, __import__('os')) : f32[2]\nreturn (%r,)")
    with pytest.raises(IRParseError, match="metadata is not read"):
        parse_graph("%x = input x : f32[2]\n%r = aten.relu.default(%x) : f32[2]  {qc.fusion=x}\nreturn (%r,)")
    with pytest.raises(IRParseError, match="must end with a 'return' line"):
        parse_graph("%x = input x : f32[2]")
    ignored = parse_graph("%x = input x : f32[2]\n%r = aten.relu.default(%x) : f32[2]  {qc.fusion=x}\nreturn (%r,)",
                          ignore_meta=True)
    assert len(example_inputs(ignored)) == 1


def test_symbolic_sizes_take_the_sizes_given():
    gm = parse_graph("%x = input x : f32[s0,4]\n%r = aten.relu.default(%x) : f32[s0,4]\nreturn (%r,)", sizes={"s0": 6})
    assert example_inputs(gm)[0].shape == (6, 4)


def test_eliminate_dead_code_on_literal_ir():
    assert_rewrites(EliminateDeadCode(), """
        %x = input x : f32[4,8]
        %unused = aten.relu.default(%x) : f32[4,8]
        %kept = aten.neg.default(%x) : f32[4,8]
        return (%kept,)
    """, """
        %x = input x : f32[4,8]
        %kept = aten.neg.default(%x) : f32[4,8]
        return (%kept,)
    """)


def test_canonicalize_drops_a_copy_and_a_no_op_conversion_on_literal_ir():
    assert_rewrites(Canonicalize(), """
        %x = input x : f32[4,8]
        %copy = aten.clone.default(%x) : f32[4,8]
        %same = aten._to_copy.default(%copy, dtype=torch.float32) : f32[4,8]
        %r = aten.relu.default(%same) : f32[4,8]
        return (%r,)
    """, """
        %x = input x : f32[4,8]
        %r = aten.relu.default(%x) : f32[4,8]
        return (%r,)
    """)


def test_eliminate_dequant_sinks_a_dequantize_below_a_view_and_drops_a_requantize_on_literal_ir():
    constants = {"s": torch.tensor(0.05), "z": torch.tensor(128, dtype=torch.int32)}
    assert_rewrites(EliminateDequant(), """
        %q = input q : u8[4,8]
        %s = constant s : f32[]
        %z = constant z : i32[]
        %x = qc.dequantize.default(%q, %s, %z, None, torch.float32) : f32[4,8]
        %v = aten.view.default(%x, [32]) : f32[32]
        %again = qc.quantize.default(%v, %s, %z, None, 0, 255, torch.uint8) : u8[32]
        %out = qc.dequantize.default(%again, %s, %z, None, torch.float32) : f32[32]
        return (%out,)
    """, """
        %q = input q : u8[4,8]
        %view_default = aten.view.default(%q, [32]) : u8[32]
        %s = constant s : f32[]
        %z = constant z : i32[]
        %out = qc.dequantize.default(%view_default, %s, %z, None, torch.float32) : f32[32]
        %dequantize_default = qc.dequantize.default(%view_default, %s, %z, None, torch.float32) : f32[32]
        return (%out,)
    """, constants=constants)  # the sunk dequantize the requantize read is dead: eliminate-dead-code's job


def test_fold_batchnorm_on_literal_ir_keeps_the_outputs():
    g = torch.Generator().manual_seed(0)
    constants = {"bn.running_mean": torch.randn(4, generator=g), "bn.running_var": torch.rand(4, generator=g) + 0.5}
    out = assert_rewrites(FoldBatchNorm(), """
        %x = input x : f32[2,3,8,8]
        %w = constant conv.weight : f32[4,3,3,3]
        %b = constant conv.bias : f32[4]
        %y = aten.conv2d.default(%x, %w, %b) : f32[2,4,6,6]
        %gamma = constant bn.weight : f32[4]
        %beta = constant bn.bias : f32[4]
        %mean = constant bn.running_mean : f32[4]
        %var = constant bn.running_var : f32[4]
        %n = aten.batch_norm.default(%y, %gamma, %beta, %mean, %var, False, 0.1, 1e-05, True) : f32[2,4,6,6]
        return (%n,)
    """, """
        %x = input x : f32[2,3,8,8]
        %y_folded_weight = constant y_folded_weight : f32[4,3,3,3]
        %y_folded_bias = constant y_folded_bias : f32[4]
        %y = aten.conv2d.default(%x, %y_folded_weight, %y_folded_bias) : f32[2,4,6,6]
        return (%y,)
    """, constants=constants)
    assert sum(1 for n in out.graph.nodes if n.op == "get_attr") == 2
