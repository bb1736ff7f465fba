from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.settings import SettingsError, load_settings


def test_defaults_and_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.host == "127.0.0.1" and settings.port == 8080
    assert settings.models_dir == tmp_path / "models" and settings.api_keys == []


def test_api_keys_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_API_KEYS", "k1, k2,,")
    assert load_settings().key_values() == ["k1", "k2"]
    assert "k1" not in repr(load_settings()), "keys are secrets: never printed"


def test_yaml_file_under_env_under_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "shipyard.yaml"
    config.write_text("port: 9000\nhost: 0.0.0.0\napi_keys: [a, b]\nengine:\n  max_model_len: 1024\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.port, settings.host, settings.key_values()) == (9000, "0.0.0.0", ["a", "b"])
    assert settings.engine.max_model_len == 1024
    monkeypatch.setenv("SHIPYARD_PORT", "9100")
    monkeypatch.setenv("SHIPYARD_ENGINE__MAX_MODEL_LEN", "512")
    assert load_settings().port == 9100 and load_settings().engine.max_model_len == 512
    assert load_settings(port=9200).port == 9200


def test_explicit_config_file_and_env_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "other.yaml"
    config.write_text("port: 9300\n")
    assert load_settings(config).port == 9300
    monkeypatch.setenv("SHIPYARD_CONFIG", str(config))
    assert load_settings().port == 9300


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port: 99999\n", "port"),
        ("prot: 1\n", "prot"),
        ("upstreams: [ftp://x]\n", "upstreams"),
        ("engine:\n  gpu_memory_utilization: 2\n", "engine.gpu_memory_utilization"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=fragment):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
