"""ONNX Runtime baselines shared by the benchmarks: the fp32 file, ORT's own ``quantize_static``
file (QDQ, uint8 activations, per-channel int8 weights) and 2-thread sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch


def float_onnx_file(model: torch.nn.Module, args: tuple, kwargs: dict, path: Path, input_names: list[str]) -> Path:
    """The float model as ONNX Runtime users export it (TorchScript exporter), batch dynamic."""
    torch.onnx.export(model, args, str(path), kwargs=kwargs or None, input_names=input_names,
                      output_names=["output"], dynamic_axes={k: {0: "batch"} for k in input_names}, dynamo=False)
    return path


def quantize_static_file(float_path: Path, feeds: Iterable[dict[str, np.ndarray]], path: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(list(feeds))

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def session_runner(path: Path) -> Callable[[dict[str, np.ndarray]], torch.Tensor]:
    """Feeds in, first output out as a tensor; 2 intra-op threads like every other row."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: torch.from_numpy(session.run(None, feeds)[0])
