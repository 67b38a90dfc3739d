"""The built-in pass library, one pass per module; importing it registers every pass by name."""

from qcompile.passes.apply_rules import ApplyRules
from qcompile.passes.canonicalize import Canonicalize
from qcompile.passes.eliminate_dead_code import EliminateDeadCode
from qcompile.passes.fold_batchnorm import FoldBatchNorm

__all__ = ["ApplyRules", "Canonicalize", "EliminateDeadCode", "FoldBatchNorm"]
