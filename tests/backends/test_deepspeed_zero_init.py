"""ZeRO-3 builds the model partitioned (``backend.zero_init``; "auto" does so for a checkpoint):
each rank holds its share of the weights from the start; a method that needs a frozen full
copy of them gets the model built whole under "auto", and is refused with zero_init = true. That training from a partitioned build gives the losses and
adapter of one process is checked in tests/lora/test_lora_in_trainer.py."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from ds_workers import zero_init_worker
from panda.errors import RecipeError
from panda.recipe import load
from standins import free_port, tiny_llama


@pytest.mark.slow
def test_each_rank_holds_half_the_weights_from_the_build(tmp_path, deepspeed_cpu_ops):
    from panda.models import tiny_tokenizer

    model = tiny_llama(0)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.load().save_pretrained(tmp_path / "base")
    full = sum(p.numel() for p in model.parameters())
    mp.spawn(zero_init_worker, args=(2, free_port(), str(tmp_path), str(tmp_path / "base")),
             nprocs=2, join=True)
    for rank in (0, 1):
        held = json.loads((tmp_path / f"zero-init-{rank}.json").read_text())
        assert held["partitioned"] and held["full"] == full
        # Each parameter is split in two, padded to an even length: half of it, give or take
        # one element per parameter.
        assert abs(held["local"] - full / 2) <= len(list(model.parameters()))
        assert not held["zero3_after_close"]  # a later model in this process builds whole


DPO_RECIPE = """
[model]
preset = "tiny-llama"
[[data.sources]]
name = "preference"
path = "pairs.jsonl"
[method]
name = "dpo"
{method}
[backend]
name = "deepspeed"
zero_stage = 3
{backend}
{lora}
"""


def dpo_recipe(tmp_path, method="", backend="", lora=""):
    path = tmp_path / "dpo.toml"
    path.write_text(DPO_RECIPE.format(method=method, backend=backend, lora=lora))
    return path


def test_a_full_weights_reference_needs_the_model_built_whole(tmp_path):
    with pytest.raises(RecipeError, match="backend.zero_init = false") as error:
        load(dpo_recipe(tmp_path, backend="zero_init = true"))
    assert "dpo.toml:13: backend.zero_init:" in str(error.value)  # file:line of the key
    load(dpo_recipe(tmp_path, backend="zero_init = true", method="precompute_ref = true"))
    load(dpo_recipe(tmp_path, backend="zero_init = true", lora="[lora]\nr = 4"))


@pytest.mark.parametrize("model, method, lora, partitioned", [
    ('path = "ckpt"', "", "", False),                       # dpo keeps a full copy
    ('path = "ckpt"', "precompute_ref = true", "", True),
    ('path = "ckpt"', "", "[lora]\nr = 4", True),
    ('preset = "tiny-llama"', "precompute_ref = true", "", False),  # a preset builds whole
])
def test_auto_builds_partitioned_from_a_checkpoint_only_when_nothing_needs_it_whole(
        tmp_path, model, method, lora, partitioned):
    from panda.backends.deepspeed import partitions_at_build

    path = dpo_recipe(tmp_path, method=method, lora=lora)
    path.write_text(path.read_text().replace('preset = "tiny-llama"', model))
    recipe = load(path)
    assert partitions_at_build(recipe.backend.options, recipe) is partitioned
