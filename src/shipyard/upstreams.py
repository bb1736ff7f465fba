"""Upstream URLs as settings hold them: ``http(s)://HOST:PORT``, or ``dns+http(s)://NAME:PORT[#deployment]`` for
one replica per address NAME resolves to (found and followed by ``router.discovery``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

PREFIX = "dns+"


@dataclass(frozen=True)
class DiscoveryTarget:
    scheme: str
    host: str
    port: int
    deployment: str = "blue"

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.scheme}://{self.host}:{self.port}#{self.deployment}"

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"


def is_discovery(upstream: str) -> bool:
    return upstream.startswith(PREFIX)


def parse_target(upstream: str) -> DiscoveryTarget:
    """``dns+http://host:port[#deployment]`` -> target; ValueError naming what is wrong."""
    if not is_discovery(upstream):
        raise ValueError(f"{upstream!r} is not a dns+http(s):// upstream")
    parts = urlsplit(upstream[len(PREFIX) :])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream {upstream!r} must look like dns+http://NAME:PORT[#deployment]")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"upstream {upstream!r}: no path or query (replicas are OpenAI servers at their root)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"upstream {upstream!r} has an invalid port") from None
    return DiscoveryTarget(parts.scheme, parts.hostname, port, parts.fragment or "blue")


def check_upstreams(urls: list[str]) -> list[str]:
    """Upstream URLs as given, checked (ValueError naming the bad one) and without trailing slashes."""
    for url in urls:
        if is_discovery(url):
            parse_target(url)
        elif not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {url!r} must start with http://, https:// or dns+http(s)://")
    return [url.rstrip("/") for url in urls]
