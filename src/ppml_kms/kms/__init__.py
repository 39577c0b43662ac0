"""Key management services: the interface and its backends."""

from __future__ import annotations

from .base import DataKey, KeyManagementService
from .config import KmsConfig
from .ehsm import EhsmClient

__all__ = ["DataKey", "EhsmClient", "KeyManagementService", "KmsConfig"]
