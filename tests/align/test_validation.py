"""`panda recipe validate` refuses preference-method recipes that cannot work, naming the key,
with exit code 2 and one error line; a good recipe passes."""

from __future__ import annotations

import pytest

from align_helpers import FIXTURES

INSTRUCTION_DATA = FIXTURES.parents[2] / "recipes" / "data" / "demo_train.jsonl"


def validate(run_panda, recipe, *sets: str):
    args = ["recipe", "validate", str(recipe)]
    for item in sets:
        args += ["--set", item]
    return run_panda(*args)


@pytest.mark.parametrize("method", ["dpo", "rm", "orpo", "simpo"])
def test_a_good_recipe_validates(run_panda, write_recipe, method):
    result = validate(run_panda, write_recipe(method))
    assert result.returncode == 0, result.stderr


CASES = {
    "pair method on instruction data": (
        dict(method="dpo", data=INSTRUCTION_DATA, source="instruction"), (),
        "data.sources[0]", "trains on preference pair data"),
    "lm method on preference data": (
        dict(method="sft"), (), "data.sources[0]", "gives preference pair data but method 'sft'"),
    "dpo on ds-pipeline": (
        dict(method="dpo", backend="ds-pipeline"), (), "method.name",
        "ds-pipeline trains next-token methods"),
    "rm on ds-pipeline": (
        dict(method="rm", backend="ds-pipeline"), (), "method.name",
        "ds-pipeline trains next-token methods"),
    "ipo with label smoothing": (
        dict(method="dpo", method_options='loss_type = "ipo"\nlabel_smoothing = 0.1'), (),
        "method.label_smoothing", "IPO has no label smoothing"),
    "label smoothing out of range": (
        dict(method="dpo", method_options="label_smoothing = 0.5"), (),
        "method.label_smoothing", "less than 0.5"),
    "rm with lm_head saved by lora": (
        dict(method="rm", extra='[lora]\nr = 4\nmodules_to_save = ["lm_head"]'), (),
        "lora.modules_to_save", "no lm_head"),
    "unknown dpo option": (
        dict(method="dpo", method_options="bta = 0.1"), (), "method.bta", "beta"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_impossible_combinations_are_refused_with_the_key(run_panda, write_recipe, case):
    recipe_args, sets, key, says = CASES[case]
    method = recipe_args.pop("method")
    result = validate(run_panda, write_recipe(method, **recipe_args), *sets)
    assert result.returncode == 2, result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert key in error[0] and says in error[0], error[0]
