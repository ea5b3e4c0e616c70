"""Our own vectorized implementation of ggml's block quantizers, byte-compatible with ggml."""

from ggufkit.kquants.api import dequantize, encode, qtype_of, quantize, supported_types, worker_processes

__all__ = ["quantize", "dequantize", "encode", "qtype_of", "supported_types", "worker_processes"]
