"""eliminate-dead-code: remove values nothing uses.

    y = f(x) with no users, f pure -> (gone)

In-place ops, assertions and other side effects stay (``Node.is_impure``). Passes leave the
values they orphan; this pass is where a pipeline says to sweep them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from qcompile.ir.graph import remove_dead_nodes
from qcompile.pipeline import Pass, PassResult


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    name: ClassVar[str] = "eliminate-dead-code"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = remove_dead_nodes(gm)
        return PassResult(gm, removed > 0, {"removed": removed} if removed else {})
