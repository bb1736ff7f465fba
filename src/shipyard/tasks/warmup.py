"""Warm-up requests for a new version: the shapes users send, structured outputs included."""

from __future__ import annotations

from typing import Any

from shipyard.tasks.intent import LabelSet, intent_body
from shipyard.tasks.reply import Message, ReplyTemplate, reply_body


class TaskWarmUp:
    """A chat turn, an intent classification (``choice`` grammar) and a templated reply (JSON schema grammar), so
    the first users of a new version do not pay for grammar compilation (a ``control.checks.WarmUp``)."""

    def __init__(self, labels: LabelSet, templates: dict[str, ReplyTemplate]) -> None:
        self.labels = labels
        self.templates = templates

    def bodies(self, model: str) -> list[dict[str, Any]]:
        bodies = [
            {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
            intent_body(model, self.labels, "I lost my card"),
        ]
        if self.templates:
            template = next(iter(self.templates.values()))
            conversation = [Message(role="user", content="My parcel is late and I want a refund.")]
            bodies.append({**reply_body(model, template, conversation), "max_tokens": 32})
        return bodies
