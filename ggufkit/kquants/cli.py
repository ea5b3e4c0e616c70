"""CLI commands owned by kquants (GGUF -> quantized GGUF)."""


def register(sub) -> None:
    pass
