"""The built-in pass library, one pass per module; importing it registers every pass by name."""

from qcompile.passes.annotate import Annotate
from qcompile.passes.apply_rules import ApplyRules
from qcompile.passes.canonicalize import Canonicalize
from qcompile.passes.convert_to_qdq import Convert
from qcompile.passes.eliminate_dead_code import EliminateDeadCode
from qcompile.passes.eliminate_dequant import EliminateDequant
from qcompile.passes.fold_batchnorm import FoldBatchNorm
from qcompile.passes.fuse_patterns import FusePatterns
from qcompile.passes.insert_observers import InsertObservers
from qcompile.passes.lower_cpu_int8 import LowerCpuInt8
from qcompile.passes.lower_float_bf16 import LowerFloatBf16
from qcompile.passes.merge_sibling_linears import MergeSiblingLinears
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
    "FusePatterns",
    "InsertObservers",
    "LowerCpuInt8",
    "LowerFloatBf16",
    "MergeSiblingLinears",
    "RelaxViews",
    "SmoothOutliers",
]
