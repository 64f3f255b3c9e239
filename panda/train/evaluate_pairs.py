"""A reward model's pairwise accuracy on held-out preference pairs (``panda eval --method rm``).

The file is read by the ``preference`` format through the training pipeline
(the same chat template, truncation and padding), the model is loaded as
``AutoModelForSequenceClassification`` (what ``rm`` exports), and each reply is
scored as in training: the head's output at the last non-pad token.
"""

from __future__ import annotations

import math
from typing import Any


def pairs_recipe(model_path: str, data_path: str, *, max_seq_length: int, dtype: str) -> Any:
    from panda import recipe as recipe_io

    source = {"name": "preference", "path": data_path}
    return recipe_io.validate({
        "run": {"name": "eval"},
        "model": {"name": "hf", "path": model_path, "dtype": dtype},
        "data": {"max_seq_length": max_seq_length, "sources": [source],
                 "eval_sources": [source]},
        "method": {"name": "rm"},
    }, default_where="panda eval")


def check_is_reward_model(model_path: str) -> None:
    """Refuse a causal LM: transformers would load it with a random score head, silently."""
    from transformers import AutoConfig

    from panda.errors import UsageError

    architectures = getattr(AutoConfig.from_pretrained(model_path), "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UsageError(f"{model_path} is a {architectures[0]}, not a reward model",
                         hint="--method rm scores the folder an 'rm' run exported; drop "
                         "--method rm to measure a language model's loss")


def evaluate_reward_model(model_path: str, data_path: str, *, batch_size: int = 8,
                          max_seq_length: int = 2048, dtype: str | None = None
                          ) -> dict[str, float]:
    """accuracy (share of pairs with r_chosen > r_rejected), loss (mean -log sigmoid of the
    reward gap), margin (mean gap), pairs."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from panda import data, registry
    from panda.errors import UsageError
    from panda.plugins.methods.preference import stacked_pairs
    from panda.plugins.methods.rm import rewards

    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    recipe = pairs_recipe(model_path, data_path, max_seq_length=max_seq_length, dtype=dtype)
    tokenizer = registry.get("model", "hf")(recipe.model.options).tokenizer(recipe)
    check_is_reward_model(model_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=getattr(torch, dtype)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load {model_path} as a reward model: {exc}",
                         hint="--method rm needs the folder a 'rm' run exported") from None
    if getattr(model.config, "num_labels", 1) != 1:
        raise UsageError(f"{model_path} has {model.config.num_labels} labels; a reward model "
                         "has one")
    prepared = data.prepare(recipe, tokenizer, split="eval", data_format="pair")
    correct, loss_sum, margin_sum, pairs = 0, 0.0, 0.0, 0
    with torch.no_grad():
        for batch in data.EvalBatches(prepared, batch_size=batch_size):
            real = int(batch["_num_pairs"])
            input_ids, _ = stacked_pairs(batch)
            scores = rewards(model, input_ids.to(device))
            half = scores.shape[0] // 2
            gap = (scores[:half] - scores[half:])[:real]
            correct += int((gap > 0).sum())
            loss_sum += float(F.softplus(-gap).sum())  # -log sigmoid(gap)
            margin_sum += float(gap.sum())
            pairs += real
    if not pairs:
        return {"accuracy": math.nan, "loss": math.nan, "margin": math.nan, "pairs": 0}
    return {"accuracy": correct / pairs, "loss": loss_sum / pairs, "margin": margin_sum / pairs,
            "pairs": pairs}
