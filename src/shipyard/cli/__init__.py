"""The ``shipyard`` command: a thin typer layer over the packages."""

from shipyard.cli import bench as _bench  # noqa: F401  (registers its commands)
from shipyard.cli import deploy as _deploy  # noqa: F401
from shipyard.cli import evaluate as _evaluate  # noqa: F401
from shipyard.cli import models as _models  # noqa: F401
from shipyard.cli import prepare as _prepare  # noqa: F401
from shipyard.cli import serve as _serve  # noqa: F401
from shipyard.cli import ui as _ui  # noqa: F401
from shipyard.cli.app import app, main

__all__ = ["app", "main"]
