"""Bearer API keys, compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from shipyard.gateway.errors import OpenAIError


class KeyChecker:
    """Checks ``Authorization: Bearer <key>`` against a fixed set of keys (never empty)."""

    def __init__(self, keys: Sequence[str]) -> None:
        cleaned = [k for k in keys if k]
        if not cleaned:
            raise ValueError("the gateway needs at least one API key (set SHIPYARD_API_KEYS or api_keys)")
        self._keys = [k.encode() for k in cleaned]

    def check(self, authorization: str | None) -> None:
        if not authorization:
            raise OpenAIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(
                401,
                "malformed Authorization header: expected 'Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        candidate = token.strip().encode()
        # Compare against every key so timing does not reveal which one (or how many) exist.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def ensure_api_key(key_file: Path, prefix: str = "sk-shipyard-") -> tuple[str, bool]:
    """The key stored in ``key_file``, or a new one written there (mode 0600). Returns (key, created)."""
    if key_file.is_file():
        key = key_file.read_text().strip()
        if key:
            return key, False
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = prefix + secrets.token_urlsafe(24)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True
