"""An exported file run by ONNX Runtime as a program of tensors: what stands in for a compiled
model where the deployment is ONNX Runtime (the decode loop of a causal LM runs its prefill and
step files with it, exactly as it runs the compiled programs in torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qcompile.errors import QCompileError


class OnnxRuntimeProgram:
    """``program(*tensors) -> [tensors]``: one ONNX Runtime CPU session over ``path``, its inputs
    fed in the file's order, its outputs returned as tensors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: Tensor) -> list[Tensor]:
        if len(args) != len(self.inputs):
            raise QCompileError(f"'{self.path}' takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), "
                                f"got {len(args)}")
        feeds = {name: np.ascontiguousarray(arg.detach().cpu().numpy()) for name, arg in zip(self.inputs, args)}
        return [torch.from_numpy(out) for out in self.session.run(None, feeds)]
