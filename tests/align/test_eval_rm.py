"""`panda eval --method rm`: a reward model's pairwise accuracy on held-out pairs, equal to
scoring each reply alone with the exported model; a causal LM is refused."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForSequenceClassification

from align_helpers import FIXTURES
from panda.job import build_job, run_job
from panda.recipe import load


def test_pairwise_accuracy_of_an_exported_reward_model(write_recipe, run_panda):
    job = build_job(load(write_recipe("rm", lr=3e-3, steps=6, eval_every=6)), resume="never")
    summary = run_job(job)
    result = run_panda("eval", "--model", summary["final"], "--data",
                       str(FIXTURES / "eval_pairs.jsonl"), "--method", "rm",
                       "--max-seq-length", "64", "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["pairs"] == 4
    # the loss is the one training's evaluation reported (margin 0): -log sigmoid(gap)
    assert math.isclose(numbers["loss"], summary["eval"]["eval_loss"], rel_tol=1e-5)

    exported = AutoModelForSequenceClassification.from_pretrained(summary["final"]).eval()
    gaps = []
    with torch.no_grad():
        for batch in job.eval_batches:
            for row in range(int(batch["_num_pairs"])):
                score = {}
                for side in ("chosen", "rejected"):
                    length = int(batch[f"{side}_attention_mask"][row].sum())
                    ids = batch[f"{side}_input_ids"][row, :length].unsqueeze(0)
                    score[side] = float(exported(input_ids=ids).logits[0, 0])  # alone, unpadded
                gaps.append(score["chosen"] - score["rejected"])
    assert numbers["accuracy"] == sum(gap > 0 for gap in gaps) / len(gaps)
    assert math.isclose(numbers["margin"], sum(gaps) / len(gaps), rel_tol=1e-4, abs_tol=1e-6)


def test_a_causal_lm_is_refused(write_recipe, run_panda):
    summary = run_job(build_job(load(write_recipe("simpo", steps=1)), resume="never"))
    result = run_panda("eval", "--model", summary["final"], "--data",
                       str(FIXTURES / "eval_pairs.jsonl"), "--method", "rm")
    assert result.returncode == 2
    assert "LlamaForCausalLM, not a reward model" in result.stderr
