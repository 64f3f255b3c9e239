"""The ``panda`` command. Thin: parse arguments, call the library, report errors.

Subcommands load lazily (``COMMANDS``) so ``panda --help`` imports neither
torch nor pydantic. A PandaError becomes one ``error:`` line, an optional
``hint:`` line and exit code 2; ``--debug`` / PANDA_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# name -> (module, attribute, one-line help shown by `panda --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "recipe": ("panda.cli.recipe_cmd", "recipe", "Validate, show, inspect the schema of, or "
               "create a recipe."),
    "plugins": ("panda.cli.plugins_cmd", "plugins", "List, check and describe installed plugins."),
    "infer": ("panda.cli.infer_cmd", "infer", "Generate text: one prompt, or a JSONL file "
              "(resumable)."),
    "chat": ("panda.cli.chat_cmd", "chat", "Chat with a model (history, streaming); "
             "--query answers once."),
    "data": ("panda.cli.data_cmd", "data", "Tokenize and pack a recipe's data; inspect rows."),
    "train": ("panda.cli.train_cmd", "train", "Train, or resume, from a recipe."),
    "convert": ("panda.cli.convert_cmd", "convert", "Checkpoint formats: HF, pipeline, ZeRO."),
    "eval": ("panda.cli.eval_cmd", "eval_", "Loss and perplexity of a saved model."),
    "merge-lora": ("panda.cli.lora_cmd", "merge_lora", "Fold a LoRA adapter into full weights."),
    "make-delta": ("panda.cli.delta_cmd", "make_delta", "Write delta weights: target - base."),
    "apply-delta": ("panda.cli.delta_cmd", "apply_delta", "Rebuild a model from delta weights: "
                    "base + delta."),
}


def _debug_on() -> bool:
    return os.environ.get("PANDA_DEBUG", "") not in ("", "0", "false")


class PandaGroup(click.Group):
    """Loads subcommands on demand and turns PandaErrors into exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        from panda.errors import PandaError

        try:
            return super().invoke(ctx)
        except PandaError as exc:
            if _debug_on():
                raise
            report_user_error(exc)
            ctx.exit(exc.exit_code)


def report_user_error(exc) -> None:
    click.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)


@click.group(cls=PandaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks (or set PANDA_DEBUG=1).")
@click.version_option(package_name="pandallm", prog_name="panda")
def cli(debug: bool) -> None:
    """panda: pre-train, fine-tune, align and serve LLMs from one TOML recipe.

    Start with `panda recipe init` or `panda train recipes/demo.toml`.
    """
    if debug:
        os.environ["PANDA_DEBUG"] = "1"


def main() -> None:
    from panda.launch import strip_local_rank_argument

    sys.argv = strip_local_rank_argument(sys.argv)  # the DeepSpeed launcher appends it
    try:
        cli.main(prog_name="panda")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
