"""Targets: the data model and registry (``base``), and one folder per built-in target.

Importing this package registers ``cpu-int8``, ``cpu-fp8`` and ``onnx-qdq``. Nothing outside a target's
folder knows its kernels; a new backend is a new folder (or a package of your own) and one
:func:`register_target` call.
"""

from qcompile.targets import cpu_fp8, cpu_int8, onnx_qdq  # noqa: F401  (registers the built-in targets)
from qcompile.targets.base import CLEANUP, STAGES, OpRule, Target, get_target, register_target, targets

__all__ = ["CLEANUP", "STAGES", "OpRule", "Target", "get_target", "register_target", "targets"]
