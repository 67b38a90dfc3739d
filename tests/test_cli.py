"""The qcompile command: each subcommand on a real compile, exit codes, and bad input named."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcompile.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REFUSED_FILE, console, main

TINY = "examples.cli_models:tiny_block"
TINY_DATA = "examples.cli_models:tiny_batches"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    code = main(["compile", TINY, "--calib", TINY_DATA, "--out", str(folder / "tiny.qc"),
                 "--report", str(folder / "tiny.html"), "--write-plan", str(folder / "plan.json"),
                 "--onnx", str(folder / "tiny.onnx")])
    assert code == 0
    return folder


def test_compile_writes_the_model_the_report_the_plan_and_the_onnx_file(compiled):
    page = (compiled / "tiny.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="graph"' in page
    assert '<table class="diff">' in page  # the compile was dumped: each pass opens on its change
    assert json.loads((compiled / "plan.json").read_text())["target"] == "cpu-int8"
    assert (compiled / "tiny.onnx").stat().st_size > 0


def test_inspect_report_bench_and_diff(compiled, capsys, tmp_path):
    model = str(compiled / "tiny.qc")
    assert main(["inspect", model]) == 0
    shown = capsys.readouterr().out
    assert "cpu-int8 (static)" in shown and "sha256 verified" in shown and "2 int8" in shown
    assert main(["report", model, "-o", str(tmp_path / "again.html"), "--profile"]) == 0
    assert "qc::linear_int8" in (tmp_path / "again.html").read_text()  # the measured kernel profile
    assert main(["bench", model, "--model", TINY, "--repeats", "3"]) == 0
    assert "float model" in capsys.readouterr().out
    assert main(["diff", model, model]) == 0
    assert "are the same" in capsys.readouterr().out
    other = tmp_path / "other.qc"
    assert main(["compile", TINY, "--calib", TINY_DATA, "--out", str(other), "--no-smoothing"]) == 0
    assert main(["compile", TINY, "--calib", TINY_DATA, "--smoothing", "auto"]) == 0
    assert main(["compile", TINY, "--calib", TINY_DATA, "--smoothing", "1.5"]) == EXIT_BAD_INPUT
    assert "'1.5' is neither a strength from 0 to 1" in " ".join(capsys.readouterr().err.split())
    capsys.readouterr()
    assert main(["diff", model, str(other)]) == EXIT_FAILED  # they differ: scales moved, the graph too
    assert "plan linear:" in capsys.readouterr().out


def test_a_saved_model_compiles_again_into_onnx_and_a_report(compiled, tmp_path):
    assert main(["compile", str(compiled / "tiny.qc"), "--onnx", str(tmp_path / "again.onnx"),
                 "--report", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.onnx").stat().st_size > 0


def test_a_folder_of_batches_calibrates_and_mixed_shapes_name_the_file(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        np.save(data / f"batch_{i}.npy", torch.randn(4 + i, 16, generator=g).numpy())  # batch sizes may differ
    save_file({"0": torch.randn(4, 16, generator=g)}, str(data / "batch_3.safetensors"))
    assert main(["compile", TINY, "--calib", str(data), "--out", str(tmp_path / "m.qc")]) == 0
    np.save(data / "batch_4.npy", torch.randn(4, 12).numpy())
    monkeypatch.setattr(console, "width", 30)  # a narrow terminal must not break the file's name
    assert main(["compile", TINY, "--calib", str(data)]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert str(data / "batch_4.npy") in message and "float32[N,12]" in message and "float32[N,16]" in message


@pytest.mark.parametrize("model, says", [
    ("no_such_package.models:build", "cannot import module 'no_such_package.models'"),
    ("examples.cli_models:missing", "has no attribute 'missing'"),
    ("examples.cli_models:tiny_batches", "returned list, not an nn.Module"),
    ("examples.cli_models", "must be 'module:callable'"),
])
def test_a_model_that_does_not_load_is_named_with_what_was_got(model, says, capsys):
    assert main(["compile", model]) == EXIT_BAD_INPUT
    assert says in " ".join(capsys.readouterr().err.split())


def test_files_that_are_not_saved_models_are_refused_with_their_own_exit_code(compiled, tmp_path, capsys):
    assert main(["report", str(compiled / "plan.json"), "-o", str(tmp_path / "x.html")]) == EXIT_REFUSED_FILE
    assert "is not a qcompile model" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "x.html").exists()
    newer = tmp_path / "newer.qc"
    with safe_open(str(compiled / "tiny.qc"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    document = json.loads(metadata["qcompile"])
    document["format"] = 99
    save_file(tensors, str(newer), metadata={"qcompile": json.dumps(document)})
    assert main(["inspect", str(newer)]) == EXIT_REFUSED_FILE
    assert "written by a newer qcompile" in " ".join(capsys.readouterr().err.split())


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "qcompile", "inspect", "no-such-file.qc"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT and "does not exist" in done.stderr
