"""A tiny synthetic preference task: every method takes held-out pairwise accuracy from about
chance to >= 90% in a few seconds on CPU.

The preference is lexical: asked to describe something, a reply with a "good" adjective is
preferred to one with a "bad" adjective. Held-out pairs are new prompt/adjective combinations.
Accuracy is the share of held-out pairs whose chosen reply gets the higher implicit reward
(DPO: beta * log-ratio to the reference; SimPO, ORPO: average log-prob; rm: the score); a tie
counts half, so a model that cannot tell the replies apart scores 0.5.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from panda.job import build_job, run_job
from panda.recipe import load

GOOD = ["sunny", "kind", "clear", "bright", "calm", "warm", "gentle", "honest"]
BAD = ["rotten", "cruel", "murky", "broken", "angry", "cold", "harsh", "false"]
TOPICS = ["the day", "a friend", "the water", "the room", "the sea", "a coat", "a voice",
          "the news", "the sky", "a song", "the road", "a cat", "the garden", "a letter"]


def write_pairs(path, seed: int, count: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(count):
            pair = {"prompt": f"Describe {rng.choice(TOPICS)}.",
                    "chosen": f"It is {rng.choice(GOOD)}.",
                    "rejected": f"It is {rng.choice(BAD)}."}
            out.write(json.dumps(pair) + "\n")


def held_out_accuracy(job) -> float:
    """Share of held-out pairs ranked right by the method's implicit reward (ties count half)."""
    job.model.eval()
    right, pairs = 0.0, 0
    with torch.no_grad():
        for batch in job.eval_batches:
            _, count, metrics = job.method.loss(job.model, batch)
            margin, accuracy = float(metrics["rewards/margin"]), float(metrics["rewards/accuracy"])
            tie = accuracy == 0 and margin == 0  # e.g. DPO before training: policy == reference
            right += (0.5 if tie else accuracy) * int(count)
            pairs += int(count)
    job.model.train()
    return right / pairs


@pytest.mark.parametrize("method,options", [
    ("dpo", "beta = 0.1"),
    ("orpo", "beta = 0.1"),
    ("simpo", "beta = 2.0\ngamma = 0.5"),
    ("rm", ""),
], ids=["dpo", "orpo", "simpo", "rm"])
def test_held_out_accuracy_goes_from_chance_to_90_percent(write_recipe, tmp_path, method,
                                                          options):
    write_pairs(tmp_path / "train.jsonl", seed=1, count=64)
    write_pairs(tmp_path / "held_out.jsonl", seed=2, count=32)
    recipe = write_recipe(method, method_options=options, lr=3e-3, batch=8, steps=30,
                          data=tmp_path / "train.jsonl", eval_data=tmp_path / "held_out.jsonl",
                          backend="single")
    job = build_job(load(recipe), resume="never")
    before = held_out_accuracy(job)
    run_job(job)
    after = held_out_accuracy(job)
    assert before <= 0.75, before  # about chance: the random model has no preference
    assert after >= 0.9, (before, after)
