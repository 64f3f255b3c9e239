"""``panda plugins [list] [--kind K] [--check]`` and ``panda plugins show NAME``."""

from __future__ import annotations

import click

KIND_CHOICE = click.Choice(["model", "dataset", "method", "optimizer", "scheduler", "backend",
                            "infer_backend"])


@click.group(invoke_without_command=True)
@click.option("--kind", type=KIND_CHOICE, default=None, help="Only this kind.")
@click.option("--check", is_flag=True, help="Import every plugin and report failures.")
@click.pass_context
def plugins(ctx: click.Context, kind: str | None, check: bool) -> None:
    """List, check and describe installed plugins (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_plugins, kind=kind, check=check)


@plugins.command("list")
@click.option("--kind", type=KIND_CHOICE, default=None, help="Only this kind.")
@click.option("--check", is_flag=True, help="Import every plugin and report failures.")
def list_plugins(kind: str | None, check: bool) -> None:
    """List plugins by kind with the package that provides each (no imports)."""
    from panda import registry

    if check:
        _check(kind)
        return
    kinds = [kind] if kind else list(registry.KINDS)
    for each in kinds:
        entries = registry.entries(each)
        click.echo(f"{each} ({registry.KINDS[each]}):")
        if not entries:
            click.echo("  (none)")
        width = max((len(name) for name in entries), default=0)
        for name, entry in entries.items():
            claimants = registry.registry.claimants(each, name)
            if len(claimants) > 1:  # a clash: name every package, as the error will
                packages = " and ".join(sorted(c.package for c in claimants))
                click.echo(f"  {name.ljust(width)}  {packages} (clash: unusable)")
                continue
            version = f" {entry.version}" if entry.version else ""
            click.echo(f"  {name.ljust(width)}  {entry.package}{version}")


def _check(kind: str | None) -> None:
    from panda import registry

    failures = 0
    for entry, error in registry.registry.check():
        if kind and entry.kind != kind:
            continue
        status = "ok" if error is None else f"FAILED: {error}"
        failures += error is not None
        click.echo(f"{entry.kind:<13} {entry.name:<16} {entry.package:<22} {status}")
    if failures:
        raise click.exceptions.Exit(1)


@plugins.command()
@click.argument("name")
@click.option("--kind", type=KIND_CHOICE, default=None, help="Which kind, when NAME is "
              "registered under several.")
def show(name: str, kind: str | None) -> None:
    """Describe plugin NAME: its options with types, defaults and docs."""
    from rich.console import Console
    from rich.table import Table

    from panda import registry
    from panda.errors import PluginError

    kinds = [kind] if kind else [k for k in registry.KINDS if name in registry.names(k)]
    if not kinds:
        every = sorted({n for k in registry.KINDS for n in registry.names(k)})
        raise PluginError(registry.unknown_name_message("plugin", name, every))
    console = Console()
    for each in kinds:
        entry = registry.registry.entry(each, name)
        plugin = entry.load()
        console.print(f"[bold]{each} '{name}'[/bold] from {entry.package} ({entry.target})")
        if plugin.__doc__:
            console.print(plugin.__doc__.strip().splitlines()[0])
        table = Table("option", "type", "default", "description")
        for field_name, field in plugin.Options.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(
                call_default_factory=True))
            table.add_row(field_name, _type_name(field.annotation), default,
                          field.description or "")
        if plugin.Options.model_fields:
            console.print(table)
        else:
            console.print("no options")
        presets = getattr(plugin, "presets", None)
        if presets:
            console.print(_presets_table(presets))


def _presets_table(presets: dict):
    from rich.table import Table

    from panda.models.presets import parameter_count

    table = Table("preset", "type", "layers", "hidden", "heads/kv", "vocab", "params",
                  title="presets (shapes only, random init)")
    for name, shape in presets.items():
        params = parameter_count(shape) if "hidden_size" in shape else 0
        table.add_row(name, shape.get("model_type", "?"), str(shape.get("num_hidden_layers", "")),
                      str(shape.get("hidden_size", "")),
                      f"{shape.get('num_attention_heads', '')}/{shape.get('num_key_value_heads', '')}",
                      str(shape.get("vocab_size", "")),
                      f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M")
    return table


def _type_name(annotation) -> str:
    if getattr(annotation, "__args__", None):
        return str(annotation).replace("typing.", "").replace("Optional[", "optional[")
    return getattr(annotation, "__name__", str(annotation))
