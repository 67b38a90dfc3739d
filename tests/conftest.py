import pytest
import torch

from tests.models import load_minilm, minilm_inputs, resnet18


@pytest.fixture(scope="session")
def minilm():
    return load_minilm()


@pytest.fixture(scope="session")
def minilm_example(minilm):
    _, tokenizer = minilm
    return minilm_inputs(tokenizer, ["The quick brown fox.", "Graphs are data, passes are functions."], length=32)


@pytest.fixture(scope="session")
def resnet():
    return resnet18()


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from torch's global generator seeded alike: its draws do not depend on
    which tests ran before it in its worker (pytest-xdist hands tests out in no fixed order)."""
    torch.manual_seed(0)


@pytest.fixture
def bf16_gemm(monkeypatch):
    """Kernel choices as on a CPU with native bf16 GEMMs (AVX512-BF16), whatever this one has: the
    dispatch that picks bf16 kernels there is tested on every machine, and the kernels themselves
    run here on their portable paths. The choice on a CPU without them is tested on its own."""
    from qcompile.targets import cpu_features

    flags = cpu_features.cpu_flags() | {"avx512_bf16"}
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)


@pytest.fixture
def image_batch():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session", autouse=True)
def latency_cache(tmp_path_factory):
    """Measured latencies (qcompile.latency) go to a folder of this session, not the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("qcompile-cache")
    previous = os.environ.get("QCOMPILE_CACHE_DIR")
    os.environ["QCOMPILE_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["QCOMPILE_CACHE_DIR"]
    else:
        os.environ["QCOMPILE_CACHE_DIR"] = previous


def pytest_configure(config):
    """Under pytest-xdist each worker gets one of the cores: torch's own pool would otherwise run
    two threads per worker on a two-core machine, and the workers would fight over both."""
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
