"""The code blocks of a documentation page that a reader copies, collected to be run by a test (issue 38).

Runnable blocks: every ```python block, and every ```bash block whose lines are all ``curl`` commands (with their
continuation lines). Setup blocks (``scripts/up``, ``export ...``) are what the test does itself: it serves the
gateway and sets ``SHIPYARD_URL`` and ``SHIPYARD_API_KEY``. A page's examples must read those two from the
environment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Example:
    language: str
    code: str
    line: int

    def __str__(self) -> str:
        return f"{self.language} block at line {self.line}"


def runnable_examples(page: Path) -> list[Example]:
    text = page.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        language, code = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        commands = [c for c in re.split(r"(?<!\\)\n", code.strip()) if c.strip()]
        if language == "python" or (language == "bash" and commands and all(c.startswith("curl ") for c in commands)):
            found.append(Example(language, code, line))
    return found


def json_objects(output: str) -> list[object]:
    """The JSON documents printed one after another (curl -s prints no newline between answers)."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    output = output.strip()
    while at < len(output):
        value, end = decoder.raw_decode(output, at)
        objects.append(value)
        at = end
        while at < len(output) and output[at].isspace():
            at += 1
    return objects
