"""Loading the task YAML files (labels, templates) with errors that name the file and the problem."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class TaskConfigError(ValueError):
    """A labels or templates file is missing or malformed."""


def packaged(name: str) -> Path:
    return Path(str(resources.files("shipyard.tasks") / "defaults" / name))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TaskConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise TaskConfigError(f"{path} must be a non-empty mapping")
    return data
