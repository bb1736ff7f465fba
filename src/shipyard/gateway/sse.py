"""A byte-level view of an SSE stream (OpenAI chat/completions, Responses, Anthropic Messages): split into events,
find usage and the end, nothing more."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE = b"data: [DONE]"
_RESPONSE_ID = re.compile(rb'"id":\s*"(resp_[^"]+)"')


def find_response_id(data: bytes) -> str | None:
    """The first Responses API id (``resp_...``) in ``data``."""
    found = _RESPONSE_ID.search(data)
    return found.group(1).decode() if found else None


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int]:
    """(prompt, output) tokens of a usage block: OpenAI's ``prompt/completion_tokens`` or the Responses and
    Anthropic ``input/output_tokens``."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    output = usage.get("completion_tokens", usage.get("output_tokens"))
    return int(prompt or 0), int(output or 0)


def _usage_of(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The usage block of one event: top level (OpenAI, Anthropic ``message_delta``), inside ``response``
    (Responses' ``response.completed``) or ``message`` (Anthropic ``message_start``)."""
    for holder in (payload, payload.get("response"), payload.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            return holder["usage"]  # type: ignore[no-any-return]
    return None


@dataclass
class StreamScan:
    """Splits raw upstream bytes into whole SSE events and notes what metrics need.

    ``drop_usage`` removes the trailing usage-only event that the gateway asked for on the client's behalf.
    """

    drop_usage: bool = False
    end_markers: tuple[bytes, ...] = (_DONE,)
    """An event containing one of these ends the stream properly (OpenAI: ``[DONE]``; Responses:
    ``response.completed``; Anthropic: ``message_stop``)."""
    find_response_id: bool = False
    """Note the first ``resp_...`` id (the Responses API's ``response.created`` event)."""
    response_id: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    events: int = 0
    done: bool = False
    _pending: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return the complete events in ``pending + chunk`` (to forward now); keep the partial rest."""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        whole, self._pending = data[: end + 2], data[end + 2 :]
        if self.find_response_id and self.response_id is None:
            self.response_id = find_response_id(whole)
        if self.done or not (b'"usage"' in whole or any(marker in whole for marker in self.end_markers)):
            self.events += whole.count(b"\n\n")
            return whole
        kept = [event for event in whole.split(b"\n\n")[:-1] if self._keep(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        self.events += 1
        if event.startswith(_DONE) or any(marker in event for marker in self.end_markers if marker != _DONE):
            self.done = True
        if event.startswith(_DONE) or not any(marker in event for marker in _USAGE_MARKERS):
            return True
        try:
            payload = json.loads(event.partition(b"data:")[2])
            usage = _usage_of(payload)
        except (ValueError, TypeError, AttributeError):
            return True
        if usage is None:
            return True
        prompt, output = usage_tokens(usage)
        # Anthropic sends input tokens with message_start and output tokens with message_delta
        self.prompt_tokens = prompt or self.prompt_tokens or 0
        self.completion_tokens = output or self.completion_tokens or 0
        return not (self.drop_usage and not payload.get("choices"))
