"""Where the KMS is and who we are to it: endpoint, credentials and TLS trust.

Sources, first match wins per field: explicit arguments (CLI options), environment
(``PPML_KMS_URL``, ``PPML_KMS_APPID``, ``PPML_KMS_APIKEY``, ``PPML_KMS_CA_CERT``, and BigDL's
``APPID``/``APIKEY``), then a credentials file (``--credentials FILE``, ``PPML_KMS_CREDENTIALS``,
or ``~/.config/ppml-kms/credentials``) made of shell-style ``NAME=value`` lines, the same lines
``ppml-kms enroll`` prints. The apikey is never taken from a command-line argument.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..exceptions import ConfigError

__all__ = ["KmsConfig", "default_credentials_path", "read_credentials_file", "write_credentials_file"]

ENV_URL = "PPML_KMS_URL"
ENV_APPID = "PPML_KMS_APPID"
ENV_APIKEY = "PPML_KMS_APIKEY"
ENV_CA_CERT = "PPML_KMS_CA_CERT"
ENV_CREDENTIALS = "PPML_KMS_CREDENTIALS"
_KNOWN = (ENV_URL, ENV_APPID, ENV_APIKEY, ENV_CA_CERT)


def default_credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ppml-kms" / "credentials"


def read_credentials_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse ``NAME=value`` lines (``export`` prefix, quotes and ``#`` comments allowed).

    Raises:
        ConfigError: the file cannot be read or a line is not ``NAME=value``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"credentials file {path} is not UTF-8 text") from None
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, raw = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"credentials file {path}, line {lineno}: expected NAME=value")
        try:
            parts = shlex.split(raw, comments=True)
        except ValueError:
            raise ConfigError(f"credentials file {path}, line {lineno}: unbalanced quotes") from None
        values[name.strip()] = parts[0] if parts else ""
    return values


def write_credentials_file(path: str | os.PathLike[str], values: Mapping[str, str], *, force: bool = False) -> None:
    """Write ``values`` as ``NAME=value`` lines, mode 0600, atomically; refuse to overwrite unless ``force``.

    Raises:
        ConfigError: the file exists (and not ``force``) or cannot be written.
    """
    from .._files import atomic_write_bytes

    body = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()).encode()
    try:
        atomic_write_bytes(Path(path), body, mode=0o600, overwrite=force)
    except FileExistsError:
        raise ConfigError(f"{path} already exists (use --force to replace it)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class KmsConfig:
    """Endpoint, credentials and TLS settings for an eHSM-compatible KMS."""

    url: str | None = None
    appid: str | None = None
    apikey: str | None = field(default=None, repr=False)
    ca_cert: str | None = None
    insecure: bool = False
    #: The credentials file these settings were read from, if any (lets executors re-read it).
    credentials_file: str | None = None

    @classmethod
    def load(
        cls,
        *,
        url: str | None = None,
        ca_cert: str | None = None,
        insecure: bool = False,
        credentials_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KmsConfig:
        """Resolve settings from arguments, the environment and a credentials file.

        Raises:
            ConfigError: an explicitly named credentials file is unreadable or malformed.
        """
        env = os.environ if environ is None else environ
        file_values: dict[str, str] = {}
        path = credentials_file or env.get(ENV_CREDENTIALS)
        if path:
            file_values = read_credentials_file(path)
        else:
            default = default_credentials_path()
            if default.is_file():
                path = str(default)
                file_values = read_credentials_file(default)
        ours_env = {k: env[k] for k in _KNOWN if env.get(k)}
        bigdl_env = {ENV_APPID: env.get("APPID", ""), ENV_APIKEY: env.get("APIKEY", "")}
        # A file named on the command line beats the environment; otherwise the environment wins.
        sources = [file_values, ours_env, bigdl_env] if credentials_file else [ours_env, bigdl_env, file_values]

        def pick(name: str) -> str | None:
            return next((s[name] for s in sources if s.get(name)), None)

        # appid and apikey always come as a pair from one source, never mixed.
        pair = next(
            ((s[ENV_APPID], s[ENV_APIKEY]) for s in sources if s.get(ENV_APPID) and s.get(ENV_APIKEY)),
            (pick(ENV_APPID), pick(ENV_APIKEY)),
        )
        return cls(
            url=url or pick(ENV_URL),
            appid=pair[0],
            apikey=pair[1],
            ca_cert=ca_cert or pick(ENV_CA_CERT),
            insecure=insecure,
            credentials_file=str(path) if path else None,
        )

    def require_url(self) -> str:
        if not self.url:
            raise ConfigError(f"no KMS endpoint: set {ENV_URL} (e.g. https://127.0.0.1:9000/ehsm) or pass --url")
        return self.url

    def require_credentials(self) -> tuple[str, str]:
        if not self.appid or not self.apikey:
            raise ConfigError(
                f"no KMS credentials: set {ENV_APPID} and {ENV_APIKEY} (from `ppml-kms enroll`) "
                f"or put them in a credentials file ({ENV_CREDENTIALS})"
            )
        return self.appid, self.apikey

    def without_secret(self) -> KmsConfig:
        """A copy without the apikey, safe to ship to Spark executors; they re-resolve it."""
        return replace(self, apikey=None)

    def resolved(self) -> KmsConfig:
        """Fill a missing apikey (and other fields) from the credentials file or environment here."""
        if self.apikey:
            return self
        here = KmsConfig.load(credentials_file=self.credentials_file)
        if self.appid and here.appid and here.appid != self.appid:
            raise ConfigError("the credentials available here belong to another appid")
        return replace(self, appid=self.appid or here.appid, apikey=here.apikey)

    def check_ca_cert(self) -> None:
        if self.ca_cert and not Path(self.ca_cert).is_file():
            raise ConfigError(f"CA certificate {self.ca_cert} does not exist")

