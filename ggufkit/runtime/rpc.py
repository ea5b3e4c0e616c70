"""llama.cpp's RPC backend: layers of a model run on `ggml-rpc-server`s on other machines (`--rpc`).

Each server's devices are registered with ggml while a model is loaded and its context made, as
llama.cpp's own --rpc does, so llama.cpp's default device choice puts them first; then they are taken
off ggml's registry again (the model keeps them), so a later model in the same process loads as
without --rpc, and never reaches for a server that has gone. ggml takes devices off only with the
backend they belong to, the RPC backend itself: so only where ggufkit registered that backend (from
GGUFKIT_GGML_RPC); llama-cpp-python's own is left as it is, with the devices, as llama.cpp's tools do.

The RPC backend is the one built into llama-cpp-python, or else the libggml-rpc.so named by
GGUFKIT_GGML_RPC, built with GGML_RPC=ON from the llama.cpp llama-cpp-python vendors: it binds to the
libggml-base already loaded by its soname, so both must come from the same source."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from ggufkit.errors import GgufkitError
from ggufkit.runtime.load import ggml_library

ENV = "GGUFKIT_GGML_RPC"
NO_RPC = ("this llama-cpp-python has no RPC backend: reinstall it with CMAKE_ARGS=\"-DGGML_RPC=on\", or set "
          f"{ENV} to a libggml-rpc.so built with -DGGML_RPC=ON from the same llama.cpp (README: RPC)")
_libraries: dict[str, ctypes.CDLL] = {}  # loaded RPC backends stay loaded: models hold their functions


def parse_servers(value: str | Sequence[str] | None) -> list[str]:
    """'HOST:PORT[,HOST:PORT...]' (or a list of such) -> the endpoints in order, without repeats;
    a one-line GgufkitError names the first malformed one. IPv6 addresses are not accepted: ggml's
    RPC client splits an endpoint at its first colon."""
    if value is None:
        return []
    parts = [p.strip() for item in ([value] if isinstance(value, str) else value) for p in item.split(",")]
    servers: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not (sep and host and ":" not in host and port.isdigit() and 0 < int(port) < 65536):
            raise GgufkitError(f"--rpc: {part!r} is not HOST:PORT (e.g. 192.168.1.20:50052)")
        if part not in servers:
            servers.append(part)
    return servers


def offloaded_layers(n_gpu_layers: int, servers) -> int:
    """Layers to offload: with RPC servers, 0 (the default) means all, since nothing reaches them else."""
    return -1 if servers and n_gpu_layers == 0 else n_gpu_layers


def _ggml() -> ctypes.CDLL:
    ggml = ggml_library("libggml.so")
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_unload.restype = None
    ggml.ggml_backend_unload.argtypes = [ctypes.c_void_p]
    return ggml


def _rpc_backend(ggml: ctypes.CDLL) -> tuple[int, bool]:
    """ggml's RPC backend registration: llama-cpp-python's own, else the one of GGUFKIT_GGML_RPC's
    library, then registered here (True)."""
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if reg:
        return reg, False
    path = os.environ.get(ENV)
    if not path:
        raise GgufkitError(NO_RPC)
    if not Path(path).is_file():
        raise GgufkitError(f"{ENV}={path}: no such file")
    try:
        lib = _libraries.get(path) or ctypes.CDLL(path)
    except OSError as exc:
        raise GgufkitError(f"{ENV}: {exc}") from None
    if not hasattr(lib, "ggml_backend_rpc_reg"):
        raise GgufkitError(f"{ENV}={path} is not ggml's RPC backend (it has no ggml_backend_rpc_reg)")
    init = lib.ggml_backend_rpc_reg
    init.restype = ctypes.c_void_p
    reg = init()
    # struct ggml_backend_reg starts with its int api_version: a library built from another ggml
    # must not be registered (ggml_backend_load makes the same check)
    cpu = ggml.ggml_backend_reg_by_name(b"CPU")
    if not reg or (cpu and ctypes.c_int.from_address(reg).value != ctypes.c_int.from_address(cpu).value):
        raise GgufkitError(f"{ENV}={path} was built from another ggml than llama-cpp-python's")
    _libraries[path] = lib
    ggml.ggml_backend_register(reg)  # the RPC backend itself, without devices: llama_supports_rpc
    return reg, True


def _check_reachable(server: str) -> None:
    """ggml's client aborts the process when it cannot connect: say so here instead."""
    host, _, port = server.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise GgufkitError(f"--rpc: cannot reach the RPC server at {server}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def rpc_devices(servers: str | Sequence[str] | None) -> Iterator[None]:
    """Within the block, ggml knows each server's devices, so llama.cpp offloads to them the models
    loaded there (those keep their devices afterwards). No servers: nothing happens."""
    servers = parse_servers(servers)
    if not servers:
        yield
        return
    ggml = _ggml()
    backend, registered = _rpc_backend(ggml)
    added = [backend] if registered else []  # unloaded last: that takes the devices off
    try:
        address = ggml.ggml_backend_reg_get_proc_address(backend, b"ggml_backend_rpc_add_server")
        if not address:
            raise GgufkitError("the RPC backend has no ggml_backend_rpc_add_server (another llama.cpp version)")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
        for server in servers:
            _check_reachable(server)
            reg = add_server(server.encode())
            if not reg:
                raise GgufkitError(f"--rpc: the RPC server at {server} has no devices")
            ggml.ggml_backend_register(reg)
            added.append(reg)
        yield
    finally:
        for reg in reversed(added):
            ggml.ggml_backend_unload(reg)
