"""``panda data prepare|inspect RECIPE``: build the data cache, and look at packed rows."""

from __future__ import annotations

import click

from panda.cli.options import recipe_argument, set_option


@click.group()
def data() -> None:
    """Tokenize and pack a recipe's data into the cache, or look at packed rows."""


@data.command()
@recipe_argument
@set_option
def prepare(recipe: str, overrides: tuple[str, ...]) -> None:
    """Tokenize and pack RECIPE's data into the cache; print what each source holds.

    Training then starts from the cache. The cache is $PANDA_CACHE, else
    ~/.cache/panda/data.
    """
    from panda.data.report import prepare_report

    for line in prepare_report(recipe, overrides):
        click.echo(line)


@data.command()
@recipe_argument
@set_option
@click.option("--n", "count", default=3, show_default=True, help="Rows (or pairs) to show.")
@click.option("--split", type=click.Choice(["train", "eval"]), default="train",
              show_default=True, help="Which split to show.")
def inspect(recipe: str, overrides: tuple[str, ...], count: int, split: str) -> None:
    """Decode the first packed rows of RECIPE's training order and show which tokens carry loss.

    On a terminal, trained tokens are green and the rest dim; otherwise trained
    text is marked [[like this]]. Each document starts with a line naming its
    file:line.
    """
    from panda.data.report import inspect_rows

    color = click.get_text_stream("stdout").isatty()
    for line in inspect_rows(recipe, overrides, count=count, split=split, color=color):
        click.echo(line, color=color)
