"""``panda make-delta`` and ``panda apply-delta``: target = base + delta."""

from __future__ import annotations

import click

overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace the output folder even if it is not empty.")
shard_size_option = click.option("--max-shard-size", default="2GB", show_default=True,
                                 help="Largest safetensors shard written (bounds memory too).")
base_option = click.option("--base", required=True, metavar="DIR",
                           help="The base model (e.g. the original LLaMA), safetensors folder.")


@click.command("make-delta")
@base_option
@click.option("--target", required=True, metavar="DIR", help="The fine-tuned model.")
@click.option("--delta", required=True, metavar="DIR", help="Folder to write the delta to.")
@overwrite_option
@shard_size_option
def make_delta(base: str, target: str, delta: str, overwrite: bool, max_shard_size: str) -> None:
    """Write DELTA such that apply-delta rebuilds TARGET from BASE bit for bit."""
    from panda.cli.progress import tensor_progress
    from panda.delta import make_delta as make
    from panda.models.shards import parse_size

    with tensor_progress("make-delta") as progress:
        report = make(base, target, delta, overwrite=overwrite,
                      max_shard_bytes=parse_size(max_shard_size), progress=progress)
    click.echo(f"wrote {delta}: {report.tensors} tensors" + _details(report))


@click.command("apply-delta")
@base_option
@click.option("--delta", required=True, metavar="DIR", help="The delta folder.")
@click.option("--target", required=True, metavar="DIR", help="Folder to write the model to.")
@overwrite_option
@shard_size_option
def apply_delta(base: str, delta: str, target: str, overwrite: bool, max_shard_size: str) -> None:
    """Write TARGET = BASE + DELTA, tensor by tensor, with the delta's config and tokenizer."""
    from panda.cli.progress import tensor_progress
    from panda.delta import apply_delta as apply
    from panda.models.shards import parse_size

    with tensor_progress("apply-delta") as progress:
        report = apply(base, delta, target, overwrite=overwrite,
                       max_shard_bytes=parse_size(max_shard_size), progress=progress)
    click.echo(f"wrote {target}: {report.tensors} tensors" + _details(report))
    if report.plain_delta:
        click.echo("note: a plain delta (no panda_delta.json): names and shapes were checked, "
                   "the base's contents could not be", err=True)


def _details(report) -> str:
    parts = []
    if report.enlarged:
        parts.append(f"{len(report.enlarged)} with added rows ({', '.join(report.enlarged)})")
    if report.exact_fixes:
        parts.append(f"{report.exact_fixes} elements stored verbatim for an exact rebuild")
    return "; " + "; ".join(parts) if parts else ""
