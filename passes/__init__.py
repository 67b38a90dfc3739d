"""The built-in target-independent passes, one per module, and their one explicit list.

:data:`BUILTIN_PASSES` is what pipeline text can name besides the registered targets' own
passes (``Target.passes``) and user passes given to :func:`qcompile.register_pass`.
"""

from qcompile.passes.annotate import Annotate
from qcompile.passes.apply_rules import ApplyRules
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.cast_fp8 import CastFp8
from qcompile.passes.canonicalize import Canonicalize
from qcompile.passes.conv1d_as_conv2d import Conv1dAsConv2d
from qcompile.passes.convert import Convert
from qcompile.passes.correct_bias import CorrectBias
from qcompile.passes.eliminate_dead_code import EliminateDeadCode
from qcompile.passes.eliminate_dequant import EliminateDequant
from qcompile.passes.fold_batchnorm import FoldBatchNorm
from qcompile.passes.inline_regions import InlineRegions
from qcompile.passes.gptq import Gptq
from qcompile.passes.insert_fake_quant import InsertFakeQuant
from qcompile.passes.insert_observers import InsertObservers
from qcompile.passes.lower_qat import LowerQat
from qcompile.passes.normalize_linears import NormalizeLinears
from qcompile.passes.prune_weights import PruneWeights
from qcompile.passes.quantize_before_pad import QuantizeBeforePad
from qcompile.passes.relax_views import RelaxViews
from qcompile.passes.smooth_outliers import SmoothOutliers
from qcompile.passes.training_ops import TrainingOps

from qcompile.pipeline import Pass, register_pass

BUILTIN_PASSES: tuple[type[Pass], ...] = (
    InlineRegions, Canonicalize, NormalizeLinears, FoldBatchNorm, Conv1dAsConv2d, EliminateDeadCode, ApplyRules, SmoothOutliers, Annotate, InsertObservers,
    Calibrate, CastFp8, Convert, EliminateDequant, RelaxViews, TrainingOps, InsertFakeQuant, LowerQat,
    PruneWeights, Gptq, CorrectBias, QuantizeBeforePad,
)
for _pass in BUILTIN_PASSES:
    register_pass(_pass)

__all__ = [
    "BUILTIN_PASSES",
    "Annotate",
    "ApplyRules",
    "Calibrate",
    "CastFp8",
    "Canonicalize",
    "Conv1dAsConv2d",
    "Convert",
    "CorrectBias",
    "EliminateDeadCode",
    "EliminateDequant",
    "FoldBatchNorm",
    "InlineRegions",
    "Gptq",
    "InsertFakeQuant",
    "InsertObservers",
    "LowerQat",
    "NormalizeLinears",
    "PruneWeights",
    "QuantizeBeforePad",
    "RelaxViews",
    "SmoothOutliers",
    "TrainingOps",
]
