"""An eHSM-compatible key management server (Starlette + uvicorn, HTTPS, SQLite).

It speaks Intel eHSM-KMS's REST API as the real server behaves (``docs/ehsm-compat.md``): one
endpoint ``/ehsm?Action=...``, HMAC-signed JSON envelopes, eHSM's replay rules, HTTP 200 with
the real status in the JSON ``code``. Customer master keys never leave the server; they are
stored wrapped under a domain key kept beside the database.

Modules (import the one you need; this package imports nothing heavy):

* :mod:`~ppml_kms.server.run`: ``serve()`` in the foreground, ``ServerThread`` for tests/demos;
* :mod:`~ppml_kms.server.app`: ``create_app(store)``, the ASGI application;
* :mod:`~ppml_kms.server.store`: ``KeyStore`` interface, ``SQLiteKeyStore``, the domain key;
* :mod:`~ppml_kms.server.tls`: ``ensure_tls()``, the self-signed certificate clients pin;
* :mod:`~ppml_kms.server.replay`: the nonce/timestamp replay cache;
* :mod:`~ppml_kms.server.validation`: eHSM's payload checker, with its exact messages.
"""

from __future__ import annotations

__all__: list[str] = []
