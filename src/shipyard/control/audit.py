"""Who changed what, when: one JSON line per admin action and rollout phase."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("shipyard.audit")


class AuditLog:
    def __init__(self, path: Path | None, model: str = "") -> None:
        self.path = path
        self.model = model
        """The fleet model whose control plane writes here: every entry says ``model`` (several share one file)."""
        self.entries: list[dict[str, Any]] = []
        self.write_failures = 0
        """Entries that could not be appended to ``path`` (kept in ``entries`` and the process log)."""

    def record(self, who: str, action: str, **details: Any) -> None:
        entry = {
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "who": who,
            "action": action,
            **({"model": self.model} if self.model else {}),
            **details,
        }
        self.entries.append(entry)
        log.info("%s by %s: %s", action, who, json.dumps(details, default=str))
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")
        except OSError as exc:  # a full disk must not stop what is being recorded (a restart, a rollback)
            self.write_failures += 1
            log.error("audit log %s not written (%s): %s %s", self.path, exc.strerror or exc, action, details)
