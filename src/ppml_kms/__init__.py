"""ppml-kms: key management and encrypted files for privacy-preserving analytics."""

from __future__ import annotations

__version__ = "0.1.0"

from .envelope import DataKeyCache, FileEncryptor, decrypt_file
from .exceptions import Error, FormatError, InvalidCiphertext, KmsError
from .format import DecryptingReader, EncryptingWriter, SegmentReader
from .kms import EhsmClient, KeyManagementService, KmsConfig

__all__ = [
    "DataKeyCache",
    "DecryptingReader",
    "EhsmClient",
    "EncryptingWriter",
    "Error",
    "FileEncryptor",
    "FormatError",
    "InvalidCiphertext",
    "KeyManagementService",
    "KmsConfig",
    "KmsError",
    "SegmentReader",
    "__version__",
    "decrypt_file",
]
