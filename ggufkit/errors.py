"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class GgufkitError(Exception):
    """A user-facing error: bad input, missing file, unsupported model. Message is one line."""

    def __init__(self, message: str, path=None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)
