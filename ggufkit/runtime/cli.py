"""CLI commands owned by runtime."""


def register(sub) -> None:
    pass
