"""A fake upstream and a gateway in front of it, both on loopback, for the gateway tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai

from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import Settings, load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, wait_for

API_KEY = "sk-test-key"


@dataclass
class Stack:
    fake: FakeOpenAI
    upstream: ServerThread
    gateway: ServerThread
    settings: Settings

    @property
    def url(self) -> str:
        return self.gateway.url

    def client(self, key: str = API_KEY, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)


def start_stack(fake: FakeOpenAI, **settings_overrides: object) -> Iterator[Stack]:
    settings = load_settings(**{"api_keys": API_KEY, "health_interval_s": 0.2, **settings_overrides})
    with ServerThread(fake) as upstream:
        app = create_app(settings, [Replica(upstream.url, name="fake-0", deployment="blue", version="v1")])
        with ServerThread(app) as gateway:
            stack = Stack(fake, upstream, gateway, settings)
            assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200)
            yield stack
