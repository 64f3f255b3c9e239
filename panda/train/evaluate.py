"""Loss and perplexity of a saved model on a data file (``panda eval``).

The file goes through the same pipeline as training data (its dataset format
decides what is scored: the answer of instruction records, every token of
plain text), and the loss is the same sum over target tokens / their count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from panda.errors import UsageError

# First-record keys -> dataset format, for files given without --format.
FORMAT_BY_KEYS: list[tuple[frozenset[str], str]] = [
    (frozenset({"input", "target"}), "instruction"),
    (frozenset({"instruction", "output"}), "alpaca"),
    (frozenset({"conversations"}), "sharegpt"),
    (frozenset({"messages"}), "chat"),
    (frozenset({"content"}), "pretrain"),
]


def guess_format(path: str) -> str:
    """The dataset format of ``path``: ``text`` for .txt, else from the first JSON record's keys."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"data file not found: {path}")
    if file.suffix == ".txt":
        return "text"
    with open(file, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        keys = set(json.loads(first))
    except (ValueError, TypeError):
        keys = set()
    for wanted, name in FORMAT_BY_KEYS:
        if wanted <= keys:
            return name
    raise UsageError(f"cannot tell the format of {path} from its first record "
                     f"(keys: {', '.join(sorted(keys)) or 'none'})",
                     hint="name it with --format (instruction, alpaca, sharegpt, chat, pretrain, "
                     "text)")


def eval_recipe(model_path: str, data_path: str, data_format: str, *, max_seq_length: int,
                dtype: str) -> Any:
    """A recipe that reads ``data_path`` as evaluation data for the model in ``model_path``."""
    from panda import recipe as recipe_io

    source = {"name": data_format, "path": data_path}
    return recipe_io.validate({
        "run": {"name": "eval"},
        "model": {"name": "hf", "path": model_path, "dtype": dtype},
        "data": {"max_seq_length": max_seq_length, "sources": [source],
                 "eval_sources": [source]},
        "method": {"name": "pretrain" if data_format in ("pretrain", "text") else "sft"},
    }, default_where="panda eval")


def evaluate_model(model_path: str, data_path: str, *, data_format: str | None = None,
                   batch_size: int = 8, max_seq_length: int = 2048,
                   dtype: str | None = None) -> dict[str, float]:
    """Mean loss over the file's target tokens, its perplexity, and the counts."""
    import torch
    from transformers.utils import logging as hf_logging

    from panda import data, registry

    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    recipe = eval_recipe(model_path, data_path, data_format or guess_format(data_path),
                         max_seq_length=max_seq_length, dtype=dtype)
    plugin = registry.get("model", "hf")(recipe.model.options)
    tokenizer = plugin.tokenizer(recipe)
    model = plugin.build(recipe).to(device).eval()
    model.config.use_cache = False  # packed rows: the per-document mask needs no KV cache
    method = registry.get("method", recipe.method.name)(recipe.method.options)
    prepared = data.prepare(recipe, tokenizer, split="eval", data_format="lm")
    loss_sum, units, rows = 0.0, 0, 0
    with torch.no_grad():
        for batch in data.EvalBatches(prepared, batch_size=batch_size):
            batch = {k: v.to(device) if not k.startswith("_") else v for k, v in batch.items()}
            total, count, _ = method.loss(model, batch)
            loss_sum += float(total)
            units += int(count)
            rows += int(batch["input_ids"].shape[0])
    loss = loss_sum / units if units else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": units,
            "rows": rows}
