"""Preference methods with [lora]: DPO's reference is the base with the adapter off (no copy),
only adapter weights learn, and a LoRA reward model exports an adapter (head included) that
peft loads onto the sequence-classification base with the trained scores."""

from __future__ import annotations

import math

import torch
from peft import PeftModel

from panda.job import build_job, run_job
from panda.plugins.methods.reference import StartingPolicy
from panda.plugins.methods.rm import to_sequence_classifier
from panda.plugins.models.hf import HFModel
from panda.recipe import load

LORA = "[lora]\nr = 4\nalpha = 8\ndropout = 0.0"


def base_of(recipe_path):
    recipe = load(recipe_path)
    return HFModel(recipe.model.options).build(recipe)


def test_dpo_with_lora_uses_the_base_as_reference_and_trains_only_adapters(write_recipe):
    recipe = write_recipe("dpo", method_options="beta = 0.1", lr=1e-2, steps=4, extra=LORA)
    job = build_job(load(recipe), resume="never")
    assert isinstance(job.method.reference, StartingPolicy)
    summary = run_job(job)
    assert math.isclose(summary["history"][0]["loss"], math.log(2), rel_tol=1e-6)
    assert summary["history"][-1]["loss"] < math.log(2)
    base = base_of(recipe).state_dict()
    trained = job.model.get_base_model().state_dict()
    for name, value in trained.items():
        if "lora_" not in name:  # the frozen base, also the reference, never moved
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(value, base[key], rtol=0, atol=0, msg=name)


def test_lora_reward_model_exports_an_adapter_with_its_head(write_recipe):
    recipe = write_recipe("rm", lr=1e-2, steps=4, extra=LORA)
    job = build_job(load(recipe), resume="never")
    summary = run_job(job)
    model = job.model.eval()
    assert model.peft_config["default"].task_type == "SEQ_CLS"

    base = to_sequence_classifier(base_of(recipe), job.tokenizer.pad_token_id)
    loaded = PeftModel.from_pretrained(base, summary["final"]).eval()
    batch = next(iter(job.eval_batches))
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)
