"""``shipyard prepare merge``: model preparation steps that write a new, registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shipyard.cli.app import ConfigOption, app, fail, settings_from
from shipyard.prepare.registry import RegistryError, open_output, resolve_input

prepare_app = typer.Typer(
    help="Prepare a model version: merge a LoRA adapter (more steps to come).", no_args_is_help=True
)
app.add_typer(prepare_app, name="prepare")

OutOption = Annotated[
    str, typer.Option("--out", "-o", help="Output folder, or NAME:VERSION to register it in the models directory.")
]
ForceOption = Annotated[bool, typer.Option(help="Replace an existing output (only once the new one is complete).")]


@prepare_app.command("merge")
def merge(
    base: Annotated[str, typer.Option(help="Base model: HF folder or registered NAME[:VERSION].")],
    adapter: Annotated[Path, typer.Option(help="LoRA adapter folder (PEFT format).")],
    out: OutOption,
    dtype: Annotated[str | None, typer.Option(help="bfloat16, float16 or float32 (default: the base's).")] = None,
    force: ForceOption = False,
    config: ConfigOption = None,
) -> None:
    """Merge a LoRA adapter into its base (peft merge_and_unload, safe merge); tokenizer, chat template and
    generation config come along; a manifest with every file's sha256 is written."""
    from shipyard.prepare.merge import MergeError, check_adapter, merge_lora

    settings = settings_from(config)
    try:
        base_folder, parent = resolve_input(base, settings.models_dir)
        if not adapter.is_dir():
            raise MergeError(f"adapter {adapter} is not a folder")
        check_adapter(base_folder, adapter)  # fails before the output is touched
        recipe: dict[str, Any] = {"step": "merge"}  # filled in by the merge; the manifest is written after it
        with open_output(
            out, settings.models_dir, scheme="lora-merged", parent=parent, recipe=recipe, force=force
        ) as staging:
            recipe.update(merge_lora(base_folder, adapter, staging, dtype=dtype))
    except (RegistryError, MergeError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # disk full, permissions: nothing was registered, say so in one line
        raise fail(f"merge failed, nothing was written to {out}: {exc}") from None
    typer.echo(f"merged {adapter} into {base_folder} -> {out} ({recipe['dtype']})")
