"""Shared fixtures: real models fetched once into the cache, and the checkpoints made from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufkit import models

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "emma.txt").is_file():
        pytest.fail(f"corpus not found at {CORPUS} (expected ../shared/corpus beside the repo)")
    return CORPUS


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return models.fetch(models.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return models.fetch(models.GEMMA3)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    from ggufkit.convert.export_hf import export_hf

    return export_hf(smollm2_gguf, tmp_path_factory.mktemp("hf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_gguf, tmp_path_factory) -> Path:
    from ggufkit.convert.export_hf import export_hf

    return export_hf(gemma3_gguf, tmp_path_factory.mktemp("hf") / "gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_hf, tmp_path_factory) -> Path:
    from ggufkit.convert.pipeline import convert

    return convert(smollm2_hf, tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf", out_type="F32")
