"""apply-rules: apply any registered rule set by name.

    apply-rules{rule_set=NAME}: for each rule in order, pattern -> rewrite where check passes

The generic form of every rule-based pass: a user registers a ``RuleSet`` and runs it from
pipeline text without writing a pass class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import apply_rule_set, get_rule_set


@dataclass(frozen=True)
class ApplyRules(Pass):
    name: ClassVar[str] = "apply-rules"
    rule_set: str = ""

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts = apply_rule_set(gm, get_rule_set(self.rule_set), f"{self.name}:{self.rule_set}")
        return PassResult(gm, bool(counts), dict(counts))
