"""Running and measuring GGUF files through llama-cpp-python.

Each command is a plain function, named after its module: load, chat, generate, serve, perplexity,
kld, bench, inspect (and describe, beside inspect). `from ggufkit.runtime import kld` gives the
function, imported on first use, so that using one command does not load the others; helpers come
from the modules themselves (`from ggufkit.runtime.kld import BaseLogits`)."""

import importlib
import sys
import types

# function name -> the module that defines it
_FUNCTIONS = {"bench": "bench", "chat": "chat", "describe": "inspect", "generate": "generate", "inspect": "inspect",
              "kld": "kld", "load": "load", "perplexity": "perplexity", "serve": "serve"}
__all__ = sorted(_FUNCTIONS)


def __getattr__(name: str):
    if name not in _FUNCTIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    function = getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    globals()[name] = function
    return function


class _Package(types.ModuleType):
    """Importing a submodule binds the package attribute of its name to the module (for
    `ggufkit.runtime.kld`, to the module `kld`): these names stay free for the functions."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _FUNCTIONS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
