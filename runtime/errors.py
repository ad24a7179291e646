"""The runtime's own exception types: callers catch these, never a library's."""


class EchoRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ImageReadError(EchoRuntimeError):
    """An input image could not be read; the message names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(EchoRuntimeError):
    """An engine folder is missing its manifest, or a file does not match it."""
