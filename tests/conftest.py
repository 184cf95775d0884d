"""Shared fixtures: a tiny random generator built from configs in code (no downloads)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_generator():
    from diffrl.policies.backbones.tiny import build_tiny_generator

    return build_tiny_generator(seed=0)


@pytest.fixture(scope="session")
def saved_generator(tmp_path_factory, tiny_generator):
    """The tiny generator written with save_pretrained, as a user's local model folder."""
    path = tmp_path_factory.mktemp("generator")
    tiny_generator.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` truly need CUDA: skipped, saying so, on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
