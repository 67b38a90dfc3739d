"""qcompile's exceptions. Each names what is at fault: the pass, the node, the module, the input."""

from __future__ import annotations

from torch import fx


class QCompileError(Exception):
    """Base of every error qcompile raises on purpose."""


class CaptureError(QCompileError):
    """The model could not be captured into an ATen graph."""


class PipelineOrderError(QCompileError):
    """A pipeline's passes are in an order whose requirements cannot be met."""


class PipelineParseError(QCompileError):
    """Pipeline text that does not parse, or names an unknown pass or option."""


class NodeError(QCompileError):
    """Raised by a pass about one node; the manager adds the pass and pipeline context."""

    def __init__(self, node: fx.Node, message: str):
        from qcompile.ir.graph import describe_node

        self.node = node
        self.node_description = describe_node(node)
        super().__init__(f"{message} [node {self.node_description}]")


class PassError(QCompileError):
    """A pass failed, broke its contract, or left an invalid graph."""

    def __init__(self, pass_name: str, message: str, passes_before: list[str] | tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.passes_before = tuple(passes_before)
        ran = ", ".join(self.passes_before) if self.passes_before else "none"
        super().__init__(f"pass '{pass_name}': {message} (passes run before it: {ran})")


class VerificationError(QCompileError):
    """A graph breaks an invariant (fx lint, missing metadata, qcompile's Q/DQ rules)."""


class CalibrationError(QCompileError):
    """Calibration data that cannot give quantization parameters: empty, NaN or infinite."""


class KernelMismatchError(QCompileError):
    """A lowered kernel's output differs from its Q/DQ reference by more than its tolerance,
    or the lowered graph fails where its Q/DQ graph runs."""


class ArtifactError(QCompileError):
    """A file that is not a qcompile model, is damaged, or asks for something loading refuses."""


class InputError(QCompileError):
    """A call whose inputs the compiled model cannot take, naming the input at fault."""
