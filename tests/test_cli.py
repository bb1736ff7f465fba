"""CLI failures are one plain line on stderr and a non-zero exit; nothing is started."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard import __version__
from shipyard.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.stdout.strip() == __version__


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_serve_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    assert "no config.json" in one_line_error(["serve", "--model", str(tmp_path), "--port", "0"])


def test_serve_rejects_an_unknown_profile(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    line = one_line_error(["serve", "--model", str(tmp_path), "--profile", "turbo", "--port", "0"])
    assert "unknown tuning profile 'turbo'" in line


def test_serve_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "already in use" in one_line_error(["serve", "--no-engine", "--port", str(port)])


def test_serve_without_engine_or_upstream_has_nothing_to_serve() -> None:
    assert "nothing to serve" in one_line_error(["serve", "--no-engine", "--port", "0"])


@pytest.mark.parametrize(("text", "fragment"), [("port: -1\n", "port"), ("nonsense: 1\n", "nonsense")])
def test_bad_config_file(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert fragment in one_line_error(["serve", "--config", str(config)])


def test_missing_config_file(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(["models", "pull-default", "--config", str(tmp_path / "x.yaml")])
