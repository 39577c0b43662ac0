"""The key management interface the rest of ppml-kms programs against."""

from __future__ import annotations

import abc

__all__ = ["DataKey", "KeyManagementService"]


class DataKey:
    """A fresh data key: plaintext bytes (never printed or pickled) and the KMS-wrapped form."""

    __slots__ = ("plaintext", "wrapped")

    def __init__(self, plaintext: bytes, wrapped: bytes) -> None:
        self.plaintext = plaintext
        self.wrapped = wrapped

    def __repr__(self) -> str:
        return f"DataKey(plaintext=<redacted>, wrapped={len(self.wrapped)} bytes)"

    def __reduce__(self) -> object:
        raise TypeError("DataKey holds key material and cannot be pickled")


class KeyManagementService(abc.ABC):
    """A KMS that holds primary keys and wraps/unwraps data keys under them.

    ``primary_key`` is an opaque token as the KMS returned it (an eHSM key id, or a key blob on
    2021-era eHSM). ``aad`` is bound to the wrapped data key: the same bytes must be given to unwrap.
    """

    #: Short name recorded in encrypted file headers ("ehsm", "local", ...).
    kind: str = ""

    @abc.abstractmethod
    def create_primary_key(self) -> str:
        """Create a primary key (AES-256-GCM) and return its token.

        Raises:
            KmsError: the KMS refused or could not be reached.
        """

    @abc.abstractmethod
    def generate_data_key(self, primary_key: str, length: int = 32, aad: bytes = b"") -> DataKey:
        """Generate a data key and return it in plaintext and wrapped under ``primary_key``.

        Raises:
            KmsError: the KMS refused or could not be reached.
        """

    @abc.abstractmethod
    def generate_wrapped_data_key(self, primary_key: str, length: int = 32, aad: bytes = b"") -> bytes:
        """Generate a data key and return only its wrapped form (the plaintext never leaves the KMS).

        Raises:
            KmsError: the KMS refused or could not be reached.
        """

    @abc.abstractmethod
    def unwrap_data_key(self, primary_key: str, wrapped: bytes, aad: bytes = b"") -> bytes:
        """Return the plaintext of a wrapped data key.

        Raises:
            KmsError: the KMS refused (wrong key, wrong aad, tampered blob) or could not be reached.
        """

    def identity(self) -> str:
        """A string naming this KMS instance, used to key caches (no secrets)."""
        return self.kind

    def close(self) -> None:
        """Release network resources."""

    def __enter__(self) -> KeyManagementService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
