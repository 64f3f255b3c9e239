"""``panda recipe validate|show|schema|init``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from panda.cli.options import recipe_argument, set_option


@click.group()
def recipe() -> None:
    """Validate, show, inspect the schema of, or create a recipe."""


@recipe.command()
@recipe_argument
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (and its extends chain) without running anything."""
    from panda.recipe import load

    resolved = load(recipe, overrides)
    model = resolved.model.options
    what = getattr(model, "preset", None) or getattr(model, "path", None) or resolved.model.name
    sources = ", ".join(s.name for s in resolved.data.sources)
    click.echo(f"ok: {recipe} is valid (model {what}, method {resolved.method.name}, "
               f"data {sources}, backend {resolved.backend.name})")


@recipe.command()
@recipe_argument
@set_option
@click.option("--origin", is_flag=True, help="Say where each value came from "
              "(default, file:line, or --set).")
def show(recipe: str, overrides: tuple[str, ...], origin: bool) -> None:
    """Print the fully resolved RECIPE as TOML (defaults filled in, extends merged)."""
    from panda.recipe import load_with_origins, to_toml

    resolved, origins = load_with_origins(recipe, overrides)
    click.echo(to_toml(resolved, origins if origin else None), nl=False)


@recipe.command()
def schema() -> None:
    """Print the JSON schema of recipes, with every installed plugin's options."""
    import json

    from panda import registry
    from panda.errors import PandaError
    from panda.recipe_schema import PLUGIN_SECTIONS, SourceSection

    document = _recipe_schema()
    plugins: dict[str, dict] = {}
    for section in (*PLUGIN_SECTIONS.values(), SourceSection):
        kind = section.kind
        plugins[kind] = {}
        for name in registry.names(kind):
            try:  # a broken plugin must not break the schema of all the others
                plugins[kind][name] = registry.get(kind, name).Options.model_json_schema()
            except PandaError as exc:
                plugins[kind][name] = {"x-panda-error": exc.message}
    document["x-panda-plugins"] = plugins
    click.echo(json.dumps(document, indent=2))


def _recipe_schema() -> dict:
    from panda.recipe_schema import Recipe

    return Recipe.model_json_schema()


@recipe.command()
@click.option("--model", "model", required=True, help="Preset shape (llama-7b, llama3-8b, "
              "...) or a local model folder.")
@click.option("--method", default="sft", show_default=True, help="Training method.")
@click.option("--data", "data_path", default=None, help="Training data: file, folder or glob.")
@click.option("--format", "data_format", default=None, help="Dataset plugin; default: "
              "instruction for sft, pretrain for pretrain.")
@click.option("--name", default=None, help="Run name (default: from the output file name).")
@click.option("--lora", is_flag=True, help="Train a LoRA adapter.")
@click.option("--lora-r", type=int, default=None, help="LoRA rank (implies --lora).")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (implies --lora).")
@click.option("--quant", "quant_bits", type=click.Choice(["4", "8"]), default=None,
              help="QLoRA: quantize the base to 4 or 8 bits (implies --lora).")
@click.option("--backend", default=None, help="Training backend (single, ddp, fsdp, "
              "deepspeed, ...).")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=None,
              help="DeepSpeed ZeRO stage (with --backend deepspeed).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--epochs", type=float, default=None, help="Number of epochs.")
@click.option("--seq-len", type=int, default=None, help="data.max_seq_length.")
@click.option("--batch-size", type=int, default=None, help="Micro-batch size per device.")
@click.option("--grad-accum", type=int, default=None, help="Gradient accumulation steps.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Recipe file to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def init(**flags) -> None:
    """Write a recipe from flags (validated before it is written)."""
    from panda.errors import UsageError
    from panda.recipe import validate as validate_data
    from panda.toml_io import dumps

    output = Path(flags["output"])
    if output.exists() and not flags["force"]:
        raise UsageError(f"{output} already exists", hint="choose another -o, or pass --force")
    data = recipe_from_flags(flags)
    validate_data(data, default_where=f"panda recipe init ({output})")
    header = ("# Written by `panda recipe init`. Every key: `panda recipe show "
              f"{output} --origin`; reference: docs/recipe-reference.md\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(header + dumps(data), encoding="utf-8")
    click.echo(f"wrote {output}; check it with: panda recipe validate {output}")


def recipe_from_flags(flags: dict) -> dict:
    """Recipe data holding only what the flags say (everything else stays default)."""
    from panda.errors import UsageError

    output = Path(flags["output"])
    model = flags["model"]
    from panda.models.presets import PRESETS

    model_table = {"preset": model} if model in PRESETS and not os.path.isdir(model) \
        else {"path": model}
    method = flags["method"]
    source: dict = {"name": flags["data_format"] or ("pretrain" if method == "pretrain"
                                                    else "instruction")}
    if flags["data_path"]:
        source["path"] = flags["data_path"]
    data: dict = {"run": {"name": flags["name"] or output.stem}, "model": model_table,
                  "data": {"sources": [source]}, "method": {"name": method}}
    _put(data, ("data", "max_seq_length"), flags["seq_len"])
    _put(data, ("optim", "lr"), flags["lr"])
    _put(data, ("train", "num_epochs"), flags["epochs"])
    _put(data, ("train", "per_device_batch_size"), flags["batch_size"])
    _put(data, ("train", "gradient_accumulation_steps"), flags["grad_accum"])
    if flags["zero_stage"] is not None and flags["backend"] not in (None, "deepspeed"):
        raise UsageError("--zero-stage needs --backend deepspeed")
    if flags["backend"] or flags["zero_stage"] is not None:
        data["backend"] = {"name": flags["backend"] or "deepspeed"}
        _put(data, ("backend", "zero_stage"), flags["zero_stage"])
    if flags["lora"] or flags["lora_r"] or flags["lora_alpha"] or flags["quant_bits"]:
        data["lora"] = {}
        _put(data, ("lora", "r"), flags["lora_r"])
        _put(data, ("lora", "alpha"), flags["lora_alpha"])
    if flags["quant_bits"]:
        data["quant"] = {"bits": int(flags["quant_bits"])}
    return data


def _put(data: dict, path: tuple, value) -> None:
    if value is None:
        return
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value
