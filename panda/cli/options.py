"""Click options shared by several commands."""

from __future__ import annotations

import click

recipe_argument = click.argument("recipe", type=click.Path(dir_okay=False))
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe key; VALUE is read as TOML (e.g. --set optim.lr=2e-5).")
