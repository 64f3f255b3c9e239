"""``panda merge-lora``: fold a LoRA adapter into full weights."""

from __future__ import annotations

import click


@click.command("merge-lora")
@click.option("--base", required=True, metavar="DIR", help="The model the adapter was trained "
              "on: a Hugging Face folder with safetensors weights.")
@click.option("--adapter", required=True, metavar="DIR", help="The peft adapter folder "
              "(adapter_config.json + adapter_model.safetensors).")
@click.option("--out", required=True, metavar="DIR", help="Folder for the merged model "
              "(must be empty or new).")
@click.option("--overwrite", is_flag=True, help="Replace OUT even if it is not empty.")
@click.option("--max-shard-size", default="2GB", show_default=True,
              help="Largest safetensors shard written (bounds memory too).")
def merge_lora(base: str, adapter: str, out: str, overwrite: bool, max_shard_size: str) -> None:
    """Fold a LoRA adapter into the base weights, shard by shard.

    The result loads with transformers alone, and its logits equal the adapter
    model's up to rounding in the base dtype (docs/lora.md gives the tolerance).
    """
    from panda.cli.progress import tensor_progress
    from panda.lora_merge import merge_adapter
    from panda.models.shards import parse_size

    with tensor_progress("merge-lora") as progress:
        report = merge_adapter(base, adapter, out, overwrite=overwrite,
                               max_shard_bytes=parse_size(max_shard_size), progress=progress)
    line = (f"wrote {out}: LoRA folded into {len(report.merged)} of {report.tensors} tensors")
    if report.replaced:
        line += f", {len(report.replaced)} taken whole from the adapter"
    if report.vocab_size:
        line += f"; vocab_size is now {report.vocab_size}"
    click.echo(line)
