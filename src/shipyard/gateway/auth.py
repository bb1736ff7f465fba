"""Bearer API keys, compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from shipyard.gateway.errors import OpenAIError


class KeyChecker:
    """Checks ``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``) against a fixed set of keys
    (never empty) and says whose key it is: the key's name, never the key.

    >>> KeyChecker([("team-a", "sk-1")]).check("Bearer sk-1")
    'team-a'
    """

    def __init__(self, keys: Sequence[str | tuple[str, str]]) -> None:
        named = [key if isinstance(key, tuple) else (f"key-{i + 1}", key) for i, key in enumerate(keys)]
        cleaned = [(name, key.encode()) for name, key in named if key]
        if not cleaned:
            raise ValueError("the gateway needs at least one API key (set SHIPYARD_API_KEYS or api_keys)")
        self._keys = cleaned

    def name_of(self, authorization: str | None, x_api_key: str | None = None) -> str | None:
        """The name of the key sent, or None when it is missing or unknown (no error: see ``check``)."""
        token = x_api_key.strip() if x_api_key and not authorization else ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
        if not token:
            return None
        candidate = token.encode()
        # Compare against every key so timing does not reveal which one (or how many) exist.
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = name
        return found

    def check(self, authorization: str | None, x_api_key: str | None = None) -> str:
        """The key's name; a 401 in OpenAI's shape when the key is missing, malformed or unknown."""
        if not authorization and not x_api_key:
            raise OpenAIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise OpenAIError(
                    401,
                    "malformed Authorization header: expected 'Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        name = self.name_of(authorization, x_api_key)
        if name is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return name


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
