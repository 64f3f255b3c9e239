"""``panda eval --model PATH --data FILE``: loss and perplexity of a saved model."""

from __future__ import annotations

import click


@click.command(name="eval")
@click.option("--model", "model_path", required=True, metavar="PATH",
              help="Hugging Face model folder (e.g. <output_dir>/final).")
@click.option("--data", "data_path", required=True, metavar="FILE",
              help="Held-out data: .jsonl/.json records or a .txt file.")
@click.option("--format", "data_format", default=None, metavar="NAME",
              help="Dataset format (instruction, alpaca, sharegpt, chat, pretrain, text); "
              "default: guessed from the first record.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-seq-length", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: bfloat16 on a GPU, float32 on CPU.")
@click.option("--method", type=click.Choice(["lm", "rm"]), default="lm", show_default=True,
              help="lm: next-token loss and perplexity; rm: a reward model's pairwise "
              "accuracy on preference pairs.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def eval_(model_path: str, data_path: str, data_format: str | None, batch_size: int,
          max_seq_length: int, dtype: str | None, method: str, as_json: bool) -> None:
    """Loss (mean over target tokens) and perplexity of the model at PATH on FILE, or with
    --method rm the pairwise accuracy of a reward model on preference pairs."""
    import json

    if method == "rm":
        from panda.train.evaluate_pairs import evaluate_reward_model

        pairs = evaluate_reward_model(model_path, data_path, batch_size=batch_size,
                                      max_seq_length=max_seq_length, dtype=dtype)
        click.echo(json.dumps(pairs) if as_json else
                   f"pairwise accuracy {pairs['accuracy']:.4f} | loss {pairs['loss']:.4f} | "
                   f"mean margin {pairs['margin']:.4f} | {pairs['pairs']:,} pairs")
        return
    from panda.train.evaluate import evaluate_model

    result = evaluate_model(model_path, data_path, data_format=data_format,
                            batch_size=batch_size, max_seq_length=max_seq_length, dtype=dtype)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
                   f"{result['tokens']:,} target tokens in {result['rows']:,} rows")
