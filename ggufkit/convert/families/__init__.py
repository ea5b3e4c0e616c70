"""One module per model family; each registers the HF architectures it converts. Adding a family
means adding a module here: nothing else changes."""

from __future__ import annotations

import importlib
import pkgutil

from ggufkit.convert.families.base import FAMILIES, Family
from ggufkit.errors import GgufkitError

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def family_for(config: dict, path=None) -> Family:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch](config)
    raise GgufkitError(f"unsupported architecture {archs or 'missing'}; supported: {', '.join(sorted(FAMILIES))}",
                       path)


def family_for_gguf_arch(arch: str, kv: dict | None = None) -> type[Family]:
    for fam in FAMILIES.values():
        if fam.arch_name() == arch and (kv is None or fam.reads_gguf(kv)):
            return fam
    supported = sorted({f.arch_name() for f in FAMILIES.values()})
    raise GgufkitError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported)}")
