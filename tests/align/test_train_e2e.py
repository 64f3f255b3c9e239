"""`panda train` of each preference method on the tiny preference set (Chinese included):
the run learns the training pairs, logs the reward metrics, and exports a folder that
transformers loads as the right class (the reward model scoring as it did in training)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from panda.job import build_job, run_job
from panda.recipe import load

REWARD_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"}


def train(recipe_path):
    job = build_job(load(recipe_path), resume="never")
    return job, run_job(job)


@pytest.mark.parametrize("method,options", [
    ("dpo", "beta = 0.1"),
    ("dpo", 'beta = 0.1\nloss_type = "ipo"'),
    ("orpo", "beta = 0.1"),
    ("simpo", "beta = 2.0\ngamma = 0.5"),
    ("rm", ""),
], ids=["dpo", "ipo", "orpo", "simpo", "rm"])
def test_each_method_learns_the_training_pairs_and_exports(write_recipe, method, options):
    recipe = write_recipe(method, method_options=options, lr=3e-3, steps=9, eval_every=9)
    job, summary = train(recipe)
    history = summary["history"]
    assert all(entry["units"] == 4 for entry in history[:2])  # units are pairs (4 per step)
    assert REWARD_KEYS <= history[0].keys()
    if method == "dpo" and "ipo" not in options:
        assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-6)  # policy == ref
    first_epoch = sum(entry["loss"] for entry in history[:3])
    last_epoch = sum(entry["loss"] for entry in history[-3:])
    assert last_epoch < first_epoch, [entry["loss"] for entry in history]
    assert history[-1]["rewards/accuracy"] >= 0.75
    assert math.isfinite(summary["eval"]["eval_loss"])
    metrics = [json.loads(line) for line in
               (job.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("rewards/margin" in line for line in metrics)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if method == "rm" else AutoModelForCausalLM
    exported = auto_class.from_pretrained(summary["final"]).eval()
    assert type(exported).__name__ == type(job.model).__name__
    trained = job.model.eval()
    batch = next(iter(job.eval_batches))
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    with torch.no_grad():
        expected, actual = trained(input_ids=ids).logits, exported(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if method == "rm":  # one score per sequence, read where training read it
        assert actual.shape == (ids.shape[0], 1)
        assert exported.config.pad_token_id == job.tokenizer.pad_token_id
