"""`shipyard prepare merge` on a tiny random Llama: merged logits equal base+adapter logits, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.prepare.registry import Registry

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

runner = CliRunner()


def tiny_base(folder: Path, *, hidden: int = 32, tied: bool = False, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return folder


def tiny_adapter(base: Path, folder: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def logits(model: object, ids: object) -> object:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator,attr-defined]


@pytest.mark.parametrize("tied", [False, True])
def test_merged_logits_equal_base_plus_adapter(tmp_path: Path, tied: bool) -> None:
    base = tiny_base(tmp_path / "base", tied=tied)
    adapter = tiny_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["prepare", "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    assert torch.allclose(logits(merged, ids), logits(reference.eval(), ids), atol=1e-5)
    assert not torch.allclose(logits(merged, ids), logits(plain, ids), atol=1e-3)  # the adapter did something
    assert merged.config.tie_word_embeddings is tied and merged.dtype == torch.float32
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheme"] == "lora-merged" and manifest["recipe"]["adapter"] == str(adapter)
    assert manifest["recipe"]["tied_embeddings"] is tied and manifest["recipe"]["safe_merge"] is True
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "chat_template.jinja"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind


def test_merge_into_the_registry_records_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path / "data"))
    registry = Registry(tmp_path / "data" / "models")
    with registry.new_version("bot", "base", scheme="bf16") as folder:
        tiny_base(folder)
    adapter = tiny_adapter(registry.resolve("bot:base"), tmp_path / "adapter")
    args = ["prepare", "merge", "--base", "bot", "--adapter", str(adapter), "--out", "bot:merged"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = registry.get("bot", "merged")
    assert merged.parent == "bot:base" and merged.scheme == "lora-merged" and registry.verify(merged) == []
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_merge_refuses_what_does_not_fit(tmp_path: Path) -> None:
    small = tiny_base(tmp_path / "small", hidden=32)
    other = tiny_base(tmp_path / "other", hidden=64)
    adapter = tiny_adapter(other, tmp_path / "adapter-for-other")

    def merge(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["prepare", "merge", *args])
        return result.exit_code, result.stderr

    code, err = merge("--base", str(small), "--adapter", str(adapter), "--out", str(tmp_path / "x"))
    assert code == 1 and "does not fit base" in err and "in the base, the adapter's lora_A is 4x128" in err
    assert not (tmp_path / "x").exists()
    code, err = merge("--base", str(small), "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert code == 1 and "is not a folder" in err
    (tmp_path / "empty-adapter").mkdir()
    (tmp_path / "empty-adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    code, err = merge("--base", str(small), "--adapter", str(tmp_path / "empty-adapter"), "--out", str(tmp_path / "x"))
    assert code == 1 and "has no weights" in err
    code, err = merge("--base", "ghost:v1", "--adapter", str(adapter), "--out", str(tmp_path / "x"))
    assert code == 1 and "no model named 'ghost'" in err


def test_interrupted_merge_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shipyard.prepare import merge as merge_module

    base = tiny_base(tmp_path / "base")
    adapter = tiny_adapter(base, tmp_path / "adapter")
    original = merge_module.shutil.copy2

    def dies(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")  # the disk fills up after the weights were written

    monkeypatch.setattr(merge_module.shutil, "copy2", dies)
    args = ["prepare", "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "nothing was written" in result.stderr and "No space left" in result.stderr
    monkeypatch.setattr(merge_module.shutil, "copy2", original)
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / ".shipyard-staging").exists() or not any((tmp_path / ".shipyard-staging").iterdir())
