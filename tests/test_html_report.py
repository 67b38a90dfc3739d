"""The HTML report: self-contained, and rendered in a real browser (Debian's chromium, driven by
Playwright) without console errors, with a graph, charts and a table that have content."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile.html_report import precision_class
from tests.models import TinyConvNet, TinyTokenEncoder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(tmp_path: Path, model: torch.nn.Module, batches: list) -> tuple[qcompile.CompileReport, Path]:
    dumps = tmp_path / "dumps"
    qm = qcompile.compile(model, calibration_data=batches, progress=False, instruments=[qcompile.DumpIR(dumps)])
    return qm.report, qm.report.write_html(tmp_path / "report.html", dumps=dumps)


@pytest.fixture(scope="module")
def conv_report(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(4)]
    batches[2] = (batches[2][0] * 50,)  # one outlying batch: drawn red in the calibration chart
    with pytest.warns(UserWarning, match="left out of calibration"):
        return _report(tmp_path_factory.mktemp("html"), TinyConvNet(), batches)


def test_the_page_is_one_file_that_fetches_nothing(conv_report):
    report, path = conv_report
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert page.count('class="pass-row"') == len(report.passes)
    assert page.count('<g class="node') == len(report.graph)
    assert report.calibration_skipped == [3] and 'class="outlier"' in page


def test_precision_classes_colour_weight_only_and_reference_nodes():
    node = qcompile.NodeReport("emb", "embedding", "", "int8", "int8 rows looked up")
    assert precision_class(node) == "weight-only"
    linear = qcompile.NodeReport("l", "linear", "", "int8", "qc.linear_weight_only via int4pack (groups of 32)")
    assert precision_class(linear) == "weight-only"
    assert precision_class(qcompile.NodeReport("l", "linear", "", "int8", "qc.linear_int8 -> uint8")) == "int8"
    assert precision_class(qcompile.NodeReport("l", "linear", "", "fp8", "qc.linear_fp8 via bf16")) == "fp8"
    assert precision_class(qcompile.NodeReport("l", "linear", "", "int8-ref", "")) == "reference"
    assert precision_class(qcompile.NodeReport("l", "linear", "", "float", "kept float")) == "float"
    assert precision_class(None, "input") == "input"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it")
def test_the_report_renders_in_chromium_without_console_errors(conv_report, tmp_path):
    from playwright.sync_api import sync_playwright

    report, path = conv_report
    token_report, token_path = _report(tmp_path, TinyTokenEncoder(), [
        (torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(3)])
    shots = Path(os.environ.get("QCOMPILE_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        for shown, file, name in ((report, path, "conv"), (token_report, token_path, "tokens")):
            page.goto(file.as_uri())
            assert page.locator("#graph g.node").count() == len(shown.graph)
            assert page.locator("#graph path.edge").count() > 0
            assert page.locator("#sqnr rect.sqnr").count() == sum(n.sqnr_db is not None for n in shown.nodes)
            assert page.locator("#plan tbody tr").count() == len(shown.nodes)
            box = page.locator("#graph").bounding_box()
            assert box["width"] > 100 and box["height"] > 100
            page.screenshot(path=str(shots / f"report-{name}.png"), full_page=True)
        # The plan table sorts by a clicked column, numbers as numbers.
        page.goto(path.as_uri())
        page.locator("#plan th", has_text="SQNR dB").click()
        values = [float(v) for v in page.locator("#plan tbody td:nth-child(5)").all_inner_texts() if v]
        assert values == sorted(values)
        # A pass opens on its change, side by side.
        page.locator("details.pass-row summary", has_text="fold-batchnorm").first.click()
        assert page.locator("details[open] table.diff td.del").count() > 0
        assert page.locator("details[open] table.diff td.add").count() > 0
        assert page.locator("#section-calibration-ranges rect.outlier").count() > 0
        browser.close()
    assert errors == []
