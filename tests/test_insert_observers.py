"""insert-observers (passes/insert_observers.py): one observer per observed value and spec, read only by quantized edges."""

import torch
from qcompile.passes import InsertObservers

import qcompile
from qcompile.testing import assert_graph_diff, assert_pass_contract
from tests.models import TinyBlock, TinyConvNet
from tests.quant_stages import annotated


def test_observers_sit_on_quantized_edges_only():
    x = torch.randn(4, 16)
    before = annotated(TinyBlock(), x)
    after = assert_pass_contract(InsertObservers(), before, [x])
    assert_graph_diff(before, after, added=[
        "%observer_0 = module[observer_0](%x)",
        "%observer_1 = module[observer_1](%gelu)",
        "%linear = aten.linear.default(%observer_0, %up_weight, %up_bias)",  # the linears read the observers
        "%linear_1 = aten.linear.default(%observer_1, %down_weight, %down_bias)",
    ], removed=["%linear = aten.linear.default(%x,", "%linear_1 = aten.linear.default(%gelu,"])
    add = next(n for n in after.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert add.args[1].op == "placeholder"  # the residual still reads x itself, not the observer


def test_observer_goes_above_the_shape_ops_and_is_fresh_per_graph():
    x = torch.randn(2, 1, 8, 8)
    before = annotated(TinyConvNet(), x)
    first = InsertObservers()(before).graph_module
    second = InsertObservers()(before).graph_module
    pool = next(n for n in first.graph.nodes if n.target == torch.ops.aten.max_pool2d.default)
    assert pool.args[0].op == "call_module"  # relu -> observer -> max_pool -> conv
    assert first.observer_0 is not second.observer_0
    assert isinstance(first.observer_0, qcompile.MinMaxObserver)
