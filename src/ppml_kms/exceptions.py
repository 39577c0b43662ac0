"""Exceptions raised by ppml-kms.

::

    Error                       root; ``diagnostics()`` gives a one-line, user-facing reason
    ├── InvalidCiphertext       integrity failure: wrong key, tampered/truncated data (no detail)
    │   └── FormatError         not a ppml-kms file, or an unsupported version/suite
    ├── KeyFileError            missing/malformed/existing key file
    ├── OutputExistsError       refusing to overwrite an existing output
    ├── ConfigError             missing endpoint/credentials/CA, bad option values
    └── KmsError                anything from a key management service
        ├── KmsTransportError   connection, TLS, timeout, non-JSON answer
        └── KmsRequestError     the service answered with an error ``code`` (``code``, ``message``, ``action``)
            └── KmsAuthError    signature/appid/replay/timestamp refusals

Messages never contain key bytes.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "Error",
    "FormatError",
    "InvalidCiphertext",
    "KeyFileError",
    "KmsAuthError",
    "KmsError",
    "KmsRequestError",
    "KmsTransportError",
    "OutputExistsError",
]


class Error(Exception):
    """Root of every ppml-kms error."""

    def diagnostics(self) -> str:
        """A one-line explanation for users (no traceback, no secrets)."""
        text = str(self) or self.__class__.__doc__ or self.__class__.__name__
        return " ".join(text.split())


class InvalidCiphertext(Error):
    """The data failed authentication: wrong key or context, or the file was modified or truncated."""

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "decryption failed: wrong key or encryption context, or the data was modified or truncated"
        )


class FormatError(InvalidCiphertext):
    """The input is not a ppml-kms encrypted file this version can read.

    A subclass of :class:`InvalidCiphertext`: a flipped bit in the magic or version is still
    caught by ``except InvalidCiphertext``, so every modification of a file fails one way.
    """


class KeyFileError(Error):
    """A key file is missing, malformed or already exists."""


class OutputExistsError(Error):
    """The output exists and overwriting was not requested."""


class ConfigError(Error):
    """Missing or invalid configuration (endpoint, credentials, CA certificate, options)."""


class KmsError(Error):
    """A key management service failed."""


class KmsTransportError(KmsError):
    """The key management service could not be reached or answered something unreadable."""


class KmsRequestError(KmsError):
    """The key management service refused a request."""

    def __init__(self, action: str, code: int, message: str) -> None:
        self.action = action
        self.code = code
        self.message = message
        super().__init__(f"KMS {action} failed (code {code}): {message or 'no message'}")


class KmsAuthError(KmsRequestError):
    """The key management service refused our credentials or request signature."""
