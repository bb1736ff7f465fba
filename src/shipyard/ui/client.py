"""What the chat page needs from the gateway, as plain functions (no Gradio here, so they are testable alone).

Every failure becomes a :class:`GatewayError` whose message a person can act on: the gateway is not reachable,
the key was refused, the model is not served, or the gateway's own OpenAI-style error message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


class GatewayError(RuntimeError):
    """A request to the gateway failed; the message says why in words for the person at the page."""


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or Gradio's list of ``{"type": "text", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return ""


def build_messages(system: str, history: Sequence[dict[str, Any]], message: str) -> list[dict[str, str]]:
    """OpenAI chat messages: the system prompt (if any), the earlier turns, then the new user message."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for turn in history:
        role = turn.get("role")
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": message_text(turn.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


@dataclass
class GatewayClient:
    url: str
    api_key: str | None = None
    timeout_s: float = 300.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url.rstrip("/"), headers=self.headers, timeout=self.timeout_s)

    def _fail(self, exc: httpx.HTTPError) -> GatewayError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return GatewayError(f"The gateway at {self.url} is not reachable ({exc}). Is `shipyard serve` running?")
        if isinstance(exc, httpx.TimeoutException):
            return GatewayError(f"The gateway at {self.url} did not answer in time ({type(exc).__name__}).")
        return GatewayError(f"The connection to the gateway at {self.url} failed: {exc}")

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        try:
            detail = response.json().get("error", {}).get("message")
        except (ValueError, AttributeError):
            detail = None
        if response.status_code == 401:
            raise GatewayError(
                "The gateway refused the API key (401): start the page with a key the gateway accepts "
                "(`shipyard ui --api-key ...` or SHIPYARD_UI__API_KEY)."
            )
        raise GatewayError(f"The gateway answered {response.status_code}: {detail or response.text[:300]}")

    def health(self) -> str:
        """One line on the gateway's readiness, for the page's status bar (never raises)."""
        try:
            with self._client() as client:
                ready = client.get("/ready", timeout=5)
        except httpx.HTTPError as exc:
            return str(self._fail(exc))
        try:
            replicas = ready.json().get("replicas", [])
        except ValueError:
            replicas = []
        up = sum(1 for r in replicas if r.get("ready"))
        state = "ready" if ready.status_code == 200 else "not ready yet"
        return f"Gateway {self.url}: {state} ({up} of {len(replicas)} replicas ready)"

    def models(self) -> list[str]:
        try:
            with self._client() as client:
                response = client.get("/v1/models", timeout=10)
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self._check(response)
        cards = response.json().get("data", [])
        return sorted(str(m["id"]) for m in cards if m.get("kind", "generate") == "generate")  # no embedding models

    def stream_chat(
        self, model: str, messages: list[dict[str, str]], temperature: float, top_p: float, max_tokens: int
    ) -> Iterator[str]:
        """The answer's text pieces as the gateway streams them."""
        body = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "stream": True,
        }
        try:
            with self._client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise GatewayError(f"The answer was cut off: {chunk['error'].get('message', chunk['error'])}")
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._client() as client:
                response = client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self._check(response)
        answer: dict[str, Any] = response.json()
        return answer
