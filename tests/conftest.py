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


@pytest.fixture
def image_batch():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
