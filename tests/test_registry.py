"""The model registry: staging, manifests and hashes, resolution, and the CLI over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.prepare.registry import MANIFEST, Registry, RegistryError, parse_ref, sha256_of

runner = CliRunner()


def register(registry: Registry, name: str, version: str, payload: bytes = b"weights", **kw: object) -> Path:
    with registry.new_version(name, version, scheme=str(kw.pop("scheme", "bf16")), **kw) as folder:  # type: ignore[arg-type]
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "extra.txt").write_text("x")
    return registry.resolve(f"{name}:{version}")


def test_manifest_lists_every_file_with_its_real_size_and_sha256(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    folder = register(registry, "bot", "base", source="/models/in")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [f["path"] for f in manifest["files"]] == ["config.json", "model.safetensors", "sub/extra.txt"]
    for entry in manifest["files"]:
        assert entry["size"] == (folder / entry["path"]).stat().st_size
        assert entry["sha256"] == sha256_of(folder / entry["path"])
    assert manifest["size_bytes"] == sum(f["size"] for f in manifest["files"]) and manifest["source"] == "/models/in"
    assert registry.verify(registry.get("bot", "base")) == []
    (folder / "model.safetensors").write_bytes(b"tampered")
    (folder / "stray.bin").write_bytes(b"?")
    assert registry.verify(registry.get("bot")) == [
        "model.safetensors: changed (sha256 or size differs from the manifest)",
        "stray.bin: not in the manifest",
    ]


def test_resolution_newest_by_default_and_clear_errors(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    register(registry, "bot", "base")
    register(registry, "bot", "w8a8", parent="bot:base", scheme="w8a8-int8")
    assert registry.resolve("bot:base") == tmp_path / "bot" / "base"
    assert registry.get("bot", "w8a8").parent == "bot:base"
    assert registry.get("bot").version in {"base", "w8a8"}
    for ref, fragment in [("nope", "no model named 'nope'"), ("bot:v9", "no version 'v9'"), ("a b", "NAME:VERSION")]:
        with pytest.raises(RegistryError, match=fragment):
            registry.resolve(ref)
    assert parse_ref("bot") == ("bot", None) and parse_ref("bot:v1.2") == ("bot", "v1.2")


def test_interrupted_build_registers_nothing_and_existing_versions_need_force(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(RuntimeError), registry.new_version("bot", "v1", scheme="bf16") as folder:
        (folder / "half.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert registry.manifests() == [] and not (tmp_path / "bot" / "v1").exists()
    assert list((tmp_path / ".staging").iterdir()) == []
    register(registry, "bot", "v1", b"one")
    with pytest.raises(RegistryError, match="already exists"), registry.new_version("bot", "v1", scheme="bf16"):
        pass
    register(registry, "bot", "v1", b"two", force=True)
    assert (registry.resolve("bot:v1") / "model.safetensors").read_bytes() == b"two"
    assert registry.verify(registry.get("bot", "v1")) == []


def test_attach_eval_keeps_the_manifest_whole(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    register(registry, "bot", "base")
    registry.attach_eval("bot:base", "intent", {"accuracy": 0.5, "run": "reports/x"})
    assert registry.get("bot", "base").evals == {"intent": {"accuracy": 0.5, "run": "reports/x"}}
    assert registry.verify(registry.get("bot", "base")) == []


def test_models_list_and_show_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    registry = Registry(tmp_path / "models")
    assert "no registered versions" in runner.invoke(app, ["models", "list"]).stdout
    register(registry, "bot", "base")
    listing = runner.invoke(app, ["models", "list"])
    assert listing.exit_code == 0 and "bot:base" in listing.stdout and "bf16" in listing.stdout
    shown = runner.invoke(app, ["models", "show", "bot:base", "--verify"])
    assert shown.exit_code == 0 and '"sha256"' in shown.stdout and "verified: 3 files" in shown.stdout
    (tmp_path / "models" / "bot" / "base" / "config.json").write_text("{}")
    broken = runner.invoke(app, ["models", "show", "bot", "--verify"])
    assert broken.exit_code == 1 and "config.json: changed" in broken.stderr
    missing = runner.invoke(app, ["models", "show", "ghost"])
    assert missing.exit_code == 1 and "no model named 'ghost'" in missing.stderr


def test_serve_resolves_registry_references(tmp_path: Path) -> None:
    from shipyard.cli.serve import resolve_model
    from shipyard.settings import load_settings

    registry = Registry(tmp_path / "models")
    register(registry, "bot", "base")
    settings = load_settings(data_dir=tmp_path, model="bot:base")
    assert resolve_model(settings) == (str(tmp_path / "models" / "bot" / "base"), "bot")
    import typer

    with pytest.raises(typer.Exit):
        resolve_model(load_settings(data_dir=tmp_path, model="bot:v7"))
