"""``shipyard prepare merge``: model preparation steps that write a new, registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shipyard.cli.app import ConfigOption, app, fail, settings_from
from shipyard.prepare.registry import RegistryError, open_output, resolve_input

prepare_app = typer.Typer(
    help="Prepare a model version: merge a LoRA adapter, quantize with llm-compressor.", no_args_is_help=True
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


@prepare_app.command("quantize")
def quantize_command(
    model: Annotated[str, typer.Option(help="Model to quantize: HF folder or registered NAME[:VERSION].")],
    scheme: Annotated[str, typer.Option(help="w8a8-int8, w4a16 or fp8-dynamic.")],
    out: OutOption,
    calib: Annotated[
        Path | None, typer.Option(help="Calibration JSONL: {'messages'} or intent {'text','label'} lines.")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration samples.")] = 32,
    seq_len: Annotated[
        int, typer.Option(min=8, help="Longest calibration sequence (tokens); the intent prompts are ~300.")
    ] = 512,
    force: ForceOption = False,
    config: ConfigOption = None,
) -> None:
    """Quantize with llm-compressor into compressed-tensors (what vLLM loads natively); calibration defaults to
    the intent train set rendered with the chat template. llm-compressor runs in its own virtualenv, made on first
    use under data_dir/venvs."""
    from shipyard.prepare.quantize import CALIBRATED, SCHEMES, QuantizeError, quantize
    from shipyard.tasks.datasets import project_data

    settings = settings_from(config)
    if scheme not in SCHEMES:
        raise fail(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    calibration = calib or (project_data("data/intent/train.jsonl") if scheme in CALIBRATED else None)
    try:
        source, parent = resolve_input(model, settings.models_dir)
        recipe: dict[str, Any] = {"step": "quantize"}
        with open_output(out, settings.models_dir, scheme=scheme, parent=parent, recipe=recipe, force=force) as staging:
            recipe.update(
                quantize(
                    source,
                    staging,
                    scheme,
                    venvs_dir=settings.data_dir / "venvs",
                    calibration=calibration,
                    samples=samples,
                    seq_len=seq_len,
                    say=typer.echo,
                )
            )
    except (RegistryError, QuantizeError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"quantize failed, nothing was written to {out}: {exc}") from None
    typer.echo(f"quantized {source} ({scheme}) -> {out} in {recipe['seconds']} s")


@prepare_app.command("finetune")
def finetune_command(
    base: Annotated[str, typer.Option(help="Base model: HF folder or registered NAME[:VERSION].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
    data: Annotated[Path | None, typer.Option(help="Intent JSONL (default: data/intent/train.jsonl).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    learning_rate: Annotated[float, typer.Option(min=0)] = 5e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
    force: ForceOption = False,
    config: ConfigOption = None,
) -> None:
    """Train a small LoRA adapter (peft, CPU, seeded) on the intent train set, as /v1/intent asks its questions."""
    from shipyard.prepare.finetune import FinetuneError, finetune_lora, intent_examples
    from shipyard.tasks.datasets import project_data

    settings = settings_from(config)
    dataset = data or project_data("data/intent/train.jsonl")
    try:
        source, parent = resolve_input(base, settings.models_dir)
        intent_examples(dataset)  # a bad dataset fails before the model is loaded
        report: dict[str, Any] = {}
        with open_output(
            str(out.resolve()), settings.models_dir, scheme="lora-adapter", parent=parent, recipe=report, force=force
        ) as staging:
            report.update(
                finetune_lora(
                    source, dataset, staging, epochs=epochs, rank=rank, learning_rate=learning_rate,
                    batch_size=batch_size, seed=seed, max_steps=max_steps, say=typer.echo,
                )
            )  # fmt: skip
            report.pop("losses")  # kept in training_report.json; the manifest stays short
    except (RegistryError, FinetuneError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"finetune failed, nothing was written to {out}: {exc}") from None
    typer.echo(f"adapter -> {out}: {report['steps']} steps, loss {report['loss_first']} -> {report['loss_last']}")
