"""The spine on real models: capture, canonicalize and fold-batchnorm with dumps."""

import torch
from qcompile.passes import Canonicalize, FoldBatchNorm

import qcompile


def run_with_dumps(gm, dump_dir, example_args=(), example_kwargs=None):
    text_before = qcompile.print_graph(gm, show_provenance=True)
    result = qcompile.PassManager(
        [Canonicalize(), FoldBatchNorm()],
        [qcompile.DumpIR(dump_dir), qcompile.NumericCheck(example_args, example_kwargs)],
        verify=True,
    )(gm)
    assert qcompile.print_graph(gm, show_provenance=True) == text_before
    for stem in ("001_canonicalize", "002_fold-batchnorm"):
        for suffix in (".before.txt", ".after.txt", ".diff"):
            assert (dump_dir / f"{stem}{suffix}").stat().st_size > 0
    return result


def test_minilm(minilm, minilm_example, tmp_path):
    model, _ = minilm
    gm = qcompile.capture(model, kwargs=minilm_example)
    result = run_with_dumps(gm, tmp_path, example_kwargs=minilm_example)
    assert result.records[0].stats["drop-dropout"] == 13
    assert not result.records[1].modified  # a transformer has no BatchNorm
    with torch.no_grad():
        expected = model(**minilm_example).last_hidden_state
        actual = result.graph_module(**minilm_example).last_hidden_state
    torch.testing.assert_close(actual, expected)


def test_resnet18(resnet, image_batch, tmp_path):
    gm = qcompile.capture(resnet, (image_batch,))
    result = run_with_dumps(gm, tmp_path, example_args=(image_batch,))
    assert "aten.batch_norm" not in qcompile.print_graph(result.graph_module)
    other_batch = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected, actual = resnet(other_batch), result.graph_module(other_batch)
    assert qcompile.instruments.relative_error(expected, actual) <= 1e-5
