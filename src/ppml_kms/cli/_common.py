"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse

from ..exceptions import ConfigError
from ..kms.config import KmsConfig
from ..kms.ehsm import EhsmClient


def kms_config(args: argparse.Namespace) -> KmsConfig:
    return KmsConfig.load(
        url=getattr(args, "url", None),
        ca_cert=getattr(args, "ca_cert", None),
        insecure=getattr(args, "insecure", False),
        credentials_file=getattr(args, "credentials", None),
    )


def kms_client(args: argparse.Namespace, *, need_credentials: bool = True) -> EhsmClient:
    return EhsmClient.from_config(kms_config(args), need_credentials=need_credentials)


def parse_context(pairs: list[str] | None) -> dict[str, str]:
    context: dict[str, str] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context expects KEY=VALUE, got {item!r}")
        if key in context:
            raise ConfigError(f"--context key {key!r} given twice")
        context[key] = value
    return context
