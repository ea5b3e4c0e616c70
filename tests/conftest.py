"""Shared fixtures (real models fetched once into the cache, and the checkpoints made from them), and
the markers that say what a test needs, kept true: `models` goes on every test whose fixtures reach a
real model, and a test that touches llama.cpp's tools, ggml or torch (through `reference` or
`tiny_models`), or a real model, without its marker fails."""

from __future__ import annotations

from pathlib import Path

import pytest

import reference
from ggufkit import models

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
# the fixtures that fetch a real model; whatever depends on them needs it too
MODEL_FIXTURES = {"smollm2_gguf", "gemma3_gguf"}
_running: list[pytest.Item] = []  # the test being set up, run or torn down


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def _check_marker(resource: str) -> None:
    """A fixture or test touching `resource` (a marker's name) must carry that marker."""
    if _running and _running[-1].get_closest_marker(resource) is None:
        pytest.fail(f"{_running[-1].nodeid} uses {resource} but is not marked {resource!r}", pytrace=False)


reference.CHECKS.append(_check_marker)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "emma.txt").is_file():
        pytest.fail(f"corpus not found at {CORPUS} (expected ../shared/corpus beside the repo)")
    return CORPUS


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    _check_marker("models")
    return models.fetch(models.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    _check_marker("models")
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
