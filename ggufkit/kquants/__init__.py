"""Our own compiled implementation of ggml's block quantizers, byte-compatible with ggml: pure
numerics (float arrays in, block bytes out, and back)."""

from ggufkit.kquants.api import dequantize, encode, qtype_of, quantize, set_threads, supported_types

__all__ = ["quantize", "dequantize", "encode", "qtype_of", "set_threads", "supported_types"]
