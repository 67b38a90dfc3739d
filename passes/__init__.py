"""The built-in pass library, one pass per module; importing it registers every pass by name."""

from qcompile.passes.annotate import Annotate
from qcompile.passes.apply_rules import ApplyRules
from qcompile.passes.canonicalize import Canonicalize
from qcompile.passes.convert import Convert
from qcompile.passes.eliminate_dead_code import EliminateDeadCode
from qcompile.passes.eliminate_dequant import EliminateDequant
from qcompile.passes.fold_batchnorm import FoldBatchNorm
from qcompile.passes.insert_observers import InsertObservers
from qcompile.passes.relax_views import RelaxViews
from qcompile.passes.smooth_outliers import SmoothOutliers

__all__ = [
    "Annotate",
    "ApplyRules",
    "Canonicalize",
    "Convert",
    "EliminateDeadCode",
    "EliminateDequant",
    "FoldBatchNorm",
    "InsertObservers",
    "RelaxViews",
    "SmoothOutliers",
]
