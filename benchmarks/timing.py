"""The one timing rule every benchmark and the demo share: median of repeated calls after warm-up,
in ms (:func:`qcompile.profile.median_ms`, which the ``qcompile bench`` command uses too)."""

from qcompile.profile import median_ms

__all__ = ["median_ms"]
