"""The shipped training recipes validate, and say what they train."""

from __future__ import annotations

import pytest

from panda.recipe import load

RECIPES = ["recipes/demo.toml", "recipes/panda13b-sft.toml", "recipes/llama7b-pretrain.toml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_validates_through_the_cli(run_panda, path):
    result = run_panda("recipe", "validate", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {path} is valid")


def test_real_scale_recipes_mirror_pandallm():
    sft = load("recipes/panda13b-sft.toml")
    assert (sft.method.name, sft.data.sources[0].name) == ("sft", "instruction")
    assert sft.model.options.path.endswith("llama-13b") and sft.train.precision == "bf16"
    pretrain = load("recipes/llama7b-pretrain.toml")
    assert (pretrain.method.name, pretrain.data.sources[0].name) == ("pretrain", "pretrain")
    assert pretrain.data.packing and pretrain.data.max_seq_length == 2048
