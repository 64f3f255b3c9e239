"""``panda convert``: checkpoint formats (HF <-> per-layer pipeline folders, ZeRO -> HF)."""

from __future__ import annotations

import click

dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                            default=None, help="Weights dtype of the HF folder (default: the "
                            "dtype in the model config).")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace DST even if it is not empty.")


@click.group()
def convert() -> None:
    """Convert checkpoints: HF <-> pipeline layer files, DeepSpeed ZeRO -> HF."""


@convert.command("hf-to-pipeline")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@overwrite_option
def hf_to_pipeline(src: str, dst: str, overwrite: bool) -> None:
    """Split the HF folder SRC into one safetensors file per pipeline layer in DST.

    A ds-pipeline stage then reads only its own layers' files (model.path = DST).
    """
    from panda.models.pipeline_weights import hf_to_pipeline as split
    from panda.models.shards import check_output_is_not_an_input, staged_output

    check_output_is_not_an_input(dst, {"source": src})
    with staged_output(dst, overwrite) as staging:
        split(src, str(staging))
    click.echo(f"wrote {dst}")


@convert.command("pipeline-to-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@dtype_option
@overwrite_option
def pipeline_to_hf(src: str, dst: str, dtype: str | None, overwrite: bool) -> None:
    """Join the layer files of SRC (a pipeline folder, or a checkpoint step-N folder that
    ds-pipeline saved) into the HF folder DST."""
    from panda.models.pipeline_weights import pipeline_to_hf as join
    from panda.models.shards import check_output_is_not_an_input, staged_output

    check_output_is_not_an_input(dst, {"source": src})
    with staged_output(dst, overwrite) as staging:
        join(src, str(staging), dtype=dtype)
    click.echo(f"wrote {dst}")


@convert.command("zero-to-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--config", "config_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="HF folder to take config and tokenizer from (default: the "
              "checkpoint's hf-meta folder).")
@dtype_option
@overwrite_option
def zero_to_hf(src: str, dst: str, config_dir: str | None, dtype: str | None,
               overwrite: bool) -> None:
    """Merge the DeepSpeed checkpoint SRC (a step-N folder the deepspeed backend saved, or any
    save_checkpoint folder) into the HF folder DST, from its fp32 master weights."""
    from panda.backends.zero_export import convert_zero_checkpoint
    from panda.models.shards import check_output_is_not_an_input, staged_output

    check_output_is_not_an_input(dst, {"source": src})
    with staged_output(dst, overwrite) as staging:
        convert_zero_checkpoint(src, str(staging), config=config_dir, dtype=dtype)
    click.echo(f"wrote {dst}")
