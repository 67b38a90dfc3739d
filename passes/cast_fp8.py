"""cast-fp8: the float8 edges of the plan as scaled, saturating casts (E4M3 or E5M2).

    o = observer_0(y)     ->   q = qc.quantize(y, S, 0, -max, max, float8) ; o' = qc.dequantize(q, S, 0)
    linear(x, W, b)       ->   linear(x, qc.dequantize(W_q, S_W, 0, axis=0), b)

where the quantize is ``fp8(clamp(y / S, −max, max))`` (round to nearest even in the cast, as
ONNX's saturating QuantizeLinear does; max is 448 for E4M3, 57344 for E5M2) and

    S = amax · 2^margin / max

from the observer's range (static), per output channel from the weight itself, or per row of
``y`` at run time for a per-token spec (``qc.choose_qparams_per_token``). Biases stay float: a
float8 kernel adds them to a float accumulator, there is no integer step to round them to.

It is ``convert``'s conversion for the float8 formats (the same observers, weights and dynamic
edges; only the cast differs from an integer quantize), so a graph with both formats runs
``cast-fp8`` and then ``convert``, which takes the integer ones. The casts change values, so
the pass does not claim to preserve semantics; graphs without float8 edges are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qcompile.passes.convert import Convert
from qcompile.spec import QuantSpec


@dataclass(frozen=True)
class CastFp8(Convert):
    name: ClassVar[str] = "cast-fp8"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    establishes: ClassVar[frozenset[str]] = frozenset({"qdq"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def takes(self, spec: QuantSpec) -> bool:
        return spec.is_float8
