"""[lora]/[quant] combinations that cannot work are rejected when the recipe is validated."""

from __future__ import annotations

import subprocess
import sys

import pytest

from panda.adapters import lora_recipe_problems
from panda.recipe import load

def recipe_path(name: str) -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2] / "recipes" / name)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed", "ds-pipeline", "my-backend"])
def test_quant_works_with_single_and_ddp_only(backend):
    recipe = load(recipe_path("llama7b-qlora.toml"))
    assert lora_recipe_problems(recipe) == []
    recipe.backend.name = backend
    problems = dict(lora_recipe_problems(recipe))
    assert problems[("quant",)].startswith(f"[quant] (QLoRA) works with the single and ddp "
                                           f"backends, not '{backend}'")


@pytest.mark.parametrize("backend, accepted", [("single", True), ("ddp", True), ("fsdp", True),
                                               ("deepspeed", True), ("ds-pipeline", False),
                                               ("fairscale", False)])
def test_lora_backends(backend, accepted):
    recipe = load(recipe_path("llama7b-lora.toml"))
    recipe.backend.name = backend
    assert (lora_recipe_problems(recipe) == []) == accepted


def test_four_bit_options_on_an_eight_bit_base_fail_validation(run_panda):
    result = run_panda("recipe", "validate", "recipes/llama7b-qlora.toml",
                       "--set", "quant.bits=8")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: recipes/llama7b-qlora.toml:11: quant.type: applies to 4-bit quantization only; "
        "remove it or set quant.bits = 4")


def test_empty_target_modules_fail_validation(run_panda):
    result = run_panda("recipe", "validate", "recipes/llama7b-lora.toml",
                       "--set", "lora.target_modules=[]")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --set lora.target_modules=[]: lora.target_modules: "
                                     "is empty: name the modules to adapt, or use \"all-linear\"")


def test_validating_lora_recipes_imports_no_torch():
    code = ("import sys; from panda.recipe import load; "
            "[load(f'recipes/{n}') for n in ('llama7b-qlora.toml', 'llama65b-qlora.toml')]; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=recipe_path(".."),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_65b_lora_recipe_is_zero3_lora_and_rejects_qlora():
    pytest.importorskip("deepspeed")
    path = recipe_path("llama65b-lora.toml")
    recipe = load(path)
    assert (recipe.backend.name, recipe.backend.options.zero_stage) == ("deepspeed", 3)
    assert (recipe.lora.r, recipe.model.options.preset, recipe.quant) == (64, None, None)
    with pytest.raises(Exception, match=r"\[quant\] \(QLoRA\) works with the single and ddp"):
        load(path, ["quant.bits=4"])
