"""Figures the fault suite measured, for the README's reliability table.

With ``FAULT_REPORT=FILE`` set, each fault test appends one JSON line (fault, promise, figures) to FILE;
``python -m tests.faults.report FILE`` prints the table. Without it, nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def record(fault: str, promise: str, **figures: Any) -> None:
    target = os.environ.get("FAULT_REPORT")
    if not target:
        return
    line = {"fault": fault, "promise": promise, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    with Path(target).open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def table(path: Path) -> str:
    rows = ["| fault | promise | measured |", "| --- | --- | --- |"]
    for raw in path.read_text().splitlines():
        entry = json.loads(raw)
        figures = {k: v for k, v in entry.items() if k not in ("fault", "promise", "at")}
        measured = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())
        rows.append(f"| {entry['fault']} | {entry['promise']} | {measured} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
