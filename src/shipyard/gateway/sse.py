"""A byte-level view of an OpenAI SSE stream: split into events, find usage and the end, nothing more."""

from __future__ import annotations

import json
from dataclasses import dataclass

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE = b"data: [DONE]"


@dataclass
class StreamScan:
    """Splits raw upstream bytes into whole SSE events and notes what metrics need.

    ``drop_usage`` removes the trailing usage-only event that the gateway asked for on the client's behalf.
    """

    drop_usage: bool = False
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
        if self.done or not (b'"usage"' in whole or _DONE in whole):
            self.events += whole.count(b"\n\n")
            return whole
        kept = [event for event in whole.split(b"\n\n")[:-1] if self._keep(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        self.events += 1
        if event.startswith(_DONE):
            self.done = True
            return True
        if not any(marker in event for marker in _USAGE_MARKERS):
            return True
        try:
            payload = json.loads(event.partition(b"data:")[2])
            usage = payload["usage"]
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return True
        return not (self.drop_usage and not payload.get("choices"))
