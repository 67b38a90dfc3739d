"""fuse-matmul-add (targets/cpu_int8/fuse_matmul_add.py): a product with a constant matrix and the add
of a tensor of its shape become one addmm, the same value to fp32 rounding."""

import torch

import qcompile
from qcompile.targets.cpu_int8 import FuseMatmulAdd
from qcompile.testing import check_graph


class Product(torch.nn.Module):
    """x @ W + r, the shape of smooth-outliers' float path into a residual (W constant)."""

    def __init__(self, broadcast: bool = False, variable: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3, 16))
        self.broadcast, self.variable = broadcast, variable

    def forward(self, x, r):
        weight = r[0, :3, :] if self.variable else self.weight
        return torch.matmul(x, weight) + (r[0, 0] if self.broadcast else r)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 5, 3, generator=g), torch.randn(batch, 5, 16, generator=g)


def test_the_product_and_the_add_become_one_addmm():
    gm = qcompile.capture(Product(), _inputs())
    result = FuseMatmulAdd()(gm)
    assert result.modified and result.stats == {"fused": 1}
    # rows of r accumulate rows of x times W; the result takes r's shape back
    check_graph(result.graph_module, """
    CHECK: %2 = aten.reshape.default(%1, [-1, 16]) : f32[s0*s1,16]
    CHECK-NEXT: %3 = aten.reshape.default(%0, [-1, 3]) : f32[s0*s1,3]
    CHECK-NEXT: %4 = constant weight : f32[3,16]
    CHECK-NEXT: aten.addmm.default(%2, %3, %4) : f32[s0*s1,16]
    CHECK-NEXT: aten.view_as.default({{.*}}, %1) : f32[s0,s1,16]
    CHECK-NOT: aten.matmul.default
    CHECK-NOT: aten.add.Tensor
    """)
    for batch in (1, 3):  # the batch stays dynamic
        x, r = _inputs(batch)
        torch.testing.assert_close(result.graph_module(x, r), Product()(x, r), rtol=1e-6, atol=1e-6)


def test_a_broadcast_add_or_a_variable_matrix_is_left_alone():
    for model in (Product(broadcast=True), Product(variable=True)):
        result = FuseMatmulAdd()(qcompile.capture(model, _inputs()))
        assert not result.modified and result.stats == {}
