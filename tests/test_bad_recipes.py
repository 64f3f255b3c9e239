"""Malformed recipes fail with one located line: `error: FILE:LINE: KEY: message`.

Each file in tests/bad_recipes/ is recipes/demo.toml with one defect (its first
line says which). The table below says, for each, where the error must point
(the file and line where the offending key is written, or just the file when
the key is not written anywhere) and which dotted key it must name. Every case
runs through the real CLI in a subprocess (exit 2, one `error:` line, at most
one `hint:` line, no traceback) and through `panda.recipe.load` (the same key
and location on the RecipeError).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from panda.errors import RecipeError
from panda.recipe import load

ROOT = Path(__file__).resolve().parent.parent
BAD_DIR = "tests/bad_recipes"
DEMO = "recipes/demo.toml"


class Case(NamedTuple):
    recipe: str  # path relative to the repository root, as typed on the command line
    sets: tuple[str, ...]  # --set overrides
    where: str | None  # "file:line", "file", "--set ...", or None when nothing is located
    key: str | None  # the dotted key the error must name
    says: str  # a piece of the message


def bad(name: str, line: int | None, key: str | None, says: str, where_file: str | None = None
        ) -> Case:
    """A case for tests/bad_recipes/NAME.toml whose error is at LINE of WHERE_FILE (default NAME)."""
    shown = f"{BAD_DIR}/{where_file or name}.toml"
    return Case(f"{BAD_DIR}/{name}.toml", (), f"{shown}:{line}" if line else shown, key, says)


def bad_set(override: str, key: str | None, says: str, located: bool = True) -> Case:
    """A case for recipes/demo.toml with one bad --set."""
    return Case(DEMO, (override,), f"--set {override}" if located else None, key, says)


CASES: dict[str, Case] = {
    # bad TOML syntax: the line tomllib reports, and the key written on it if it has one
    "syntax_unclosed_header": bad("syntax_unclosed_header", 27, None, "invalid TOML: Expected ']'"),
    "syntax_two_values": bad("syntax_two_values", 4, "run.seed", "invalid TOML"),
    "syntax_unterminated_string": bad("syntax_unterminated_string", 3, "run.name", "invalid TOML"),
    "syntax_duplicate_key": bad("syntax_duplicate_key", 32, "train.precision",
                                "Cannot overwrite a value"),
    "syntax_duplicate_table": bad("syntax_duplicate_table", 34, "optim", "twice"),
    "syntax_unclosed_array": bad("syntax_unclosed_array", 35, "lora.target_modules",
                                 "invalid TOML"),
    # wrong types
    "type_lr_string": bad("type_lr_string", 21, "optim.lr", "should be a valid number"),
    "type_seed_fraction": bad("type_seed_fraction", 4, "run.seed", "valid integer"),
    "type_packing_array": bad("type_packing_array", 16, "data.packing", "valid boolean"),
    "type_section_not_table": bad("type_section_not_table", 2, "log",
                                  "must be a table, got a string"),
    "type_sources_not_array": bad("type_sources_not_array", 13, "data.sources",
                                  "must be an array of tables ([[data.sources]])"),
    "type_betas_too_short": bad("type_betas_too_short", 23, "optim.betas", "has too few items"),
    # unknown keys in every kind of section, with a did-you-mean where one is close
    "unknown_top_level_key": bad("unknown_top_level_key", 2, "epochs",
                                 "unknown key 'epochs' for top-level section. Allowed: run,"),
    "unknown_top_level_section": bad("unknown_top_level_section", 34, "optimizer",
                                     "did you mean 'optim'?"),
    "unknown_run_key": bad("unknown_run_key", 5, "run.sede", "did you mean 'seed'?"),
    "unknown_train_key": bad("unknown_train_key", 33, "train.batch_size",
                             "did you mean 'per_device_batch_size'?"),
    "unknown_data_key": bad("unknown_data_key", 15, "data.max_seq_len",
                            "did you mean 'max_seq_length'?"),
    "unknown_model_option": bad("unknown_model_option", 9, "model.gradient_checkpoint",
                                "for model 'hf'; did you mean 'gradient_checkpointing'"),
    "unknown_optim_option": bad("unknown_optim_option", 23, "optim.beta",
                                "for optimizer 'adamw'; did you mean 'betas'"),
    "unknown_method_option": bad("unknown_method_option", 19, "method.neftune",
                                 "for method 'sft'; did you mean 'neftune_alpha'"),
    "unknown_source_key": bad("unknown_source_key", 13, "data.sources[0].wieght",
                              "for dataset 'instruction'; did you mean 'weight'"),
    "unknown_lora_key": bad("unknown_lora_key", 35, "lora.rank", "unknown key 'rank' for [lora]"),
    # unknown plugin names: kind, name, closest match, installed names
    "plugin_model_typo": bad("plugin_model_typo", 7, "model.name",
                             "unknown model 'hff'; did you mean 'hf'"),
    "plugin_method_typo": bad("plugin_method_typo", 18, "method.name",
                              "unknown method 'sfft'; did you mean 'sft'"),
    "plugin_optimizer_typo": bad("plugin_optimizer_typo", 21, "optim.name",
                                 "unknown optimizer 'adamww'; did you mean 'adamw'"),
    "plugin_scheduler_typo": bad("plugin_scheduler_typo", 25, "schedule.name",
                                 "unknown scheduler 'warmpu'; did you mean 'warmup'"),
    "plugin_dataset_typo": bad("plugin_dataset_typo", 11, "data.sources[0].name",
                               "unknown dataset 'instructoin'; did you mean 'instruction'"),
    "plugin_backend_typo": bad("plugin_backend_typo", 35, "backend.name",
                               "unknown backend 'singel'; did you mean 'single'"),
    # The hf plugin's own validator cannot name model.preset yet, so [model] is reported.
    "model_preset_typo": bad("model_preset_typo", 6, "model",
                             "unknown preset 'tiny-lama'; did you mean 'tiny-llama'"),
    # missing required fields: located at the table that lacks them
    "missing_sources": bad("missing_sources", 11, "data.sources", "required key is missing"),
    "missing_data_section": bad("missing_data_section", None, "data", "required key is missing"),
    "missing_source_name": bad("missing_source_name", 10, "data.sources[0].name",
                               "required key is missing"),
    "model_no_path_no_preset": bad("model_no_path_no_preset", 6, "model",
                                   "set exactly one of model.path"),
    "model_path_and_preset": bad("model_path_and_preset", 6, "model",
                                 "set exactly one of model.path"),
    # bad enum values: the allowed values are listed
    "enum_precision": bad("enum_precision", 31, "train.precision",
                          "'bf16', 'fp16' or 'fp32' (got 'fp8')"),
    "enum_dtype": bad("enum_dtype", 8, "model.dtype", "'bfloat16', 'float16' or 'float32'"),
    "enum_on_bad_record": bad("enum_on_bad_record", 16, "data.on_bad_record",
                              "'error' or 'skip' (got 'ignore')"),
    "enum_quant_bits": bad("enum_quant_bits", 38, "quant.bits", "4 or 8 (got 3)"),
    # negative or zero sizes
    "size_batch_zero": bad("size_batch_zero", 28, "train.per_device_batch_size",
                           "greater than 0 (got 0)"),
    "size_seq_negative": bad("size_seq_negative", 15, "data.max_seq_length",
                             "greater than 0 (got -128)"),
    "size_lr_zero": bad("size_lr_zero", 21, "optim.lr", "greater than 0"),
    "size_lora_rank_negative": bad("size_lora_rank_negative", 35, "lora.r", "greater than 0"),
    "size_workers_negative": bad("size_workers_negative", 16, "data.num_workers",
                                 "greater than or equal to 0 (got -1)"),
    # settings that are each valid but contradict one another
    "conflict_quant_without_lora": bad("conflict_quant_without_lora", 34, "quant",
                                       "add a [lora] section"),
    "conflict_warmup_both": bad("conflict_warmup_both", 26, "schedule.warmup_proportion",
                                "set warmup_steps or warmup_proportion, not both"),
    "conflict_eval_without_data": bad("conflict_eval_without_data", 33, "train.eval_every",
                                      "evaluation needs data"),
    "conflict_max_steps_zero": bad("conflict_max_steps_zero", 33, "train.max_steps",
                                   "max_steps = 0 trains nothing"),
    "conflict_all_weights_zero": bad("conflict_all_weights_zero", 10, "data.sources",
                                     "every source has weight 0"),
    # extends: the error points at the file that holds the offending line
    "extends_cycle_a": bad("extends_cycle_a", 2, "extends",
                           "extends cycle: extends_cycle_a.toml -> extends_cycle_b.toml -> "
                           "extends_cycle_a.toml", where_file="extends_cycle_b"),
    "extends_cycle_b": bad("extends_cycle_b", 2, "extends", "extends cycle",
                           where_file="extends_cycle_a"),
    "extends_missing_file": bad("extends_missing_file", 2, "extends",
                                f"extended recipe not found: {BAD_DIR}/no_such_base.toml"),
    "extends_bad_parent": bad("extends_bad_parent", 21, "optim.lr", "(got 'fast')",
                              where_file="type_lr_string"),
    # bad --set syntax and values
    "set_no_equals": bad_set("optim.lr", None, "bad --set 'optim.lr': expected KEY=VALUE",
                             located=False),
    "set_empty_key": bad_set("=3e-4", None, "bad --set '=3e-4'", located=False),
    "set_key_starts_with_dot": bad_set(".lr=1e-4", None, "expected KEY=VALUE", located=False),
    "set_unterminated_array": bad_set("optim.betas=[0.9, 0.95", "optim.betas",
                                      "the value is not valid TOML"),
    "set_unterminated_string": bad_set('run.name="demo', "run.name", "not valid TOML"),
    "set_index_out_of_range": bad_set("data.sources[9].path=x.jsonl", "data.sources[9]",
                                      "index 9 is out of range: data.sources has"),
    "set_bad_enum": bad_set("train.precision=fp8", "train.precision", "(got 'fp8')"),
    "set_unknown_key": bad_set("optim.lrr=1e-4", "optim.lrr", "did you mean 'lr'"),
    "set_into_a_number": bad_set("optim.lr.peak=1e-4", "optim.lr", "is not a table"),
}


def expected_prefix(case: Case) -> str:
    """`error: WHERE: KEY: ` -- the exact start of the one error line."""
    parts = [part for part in (case.where, case.key) if part]
    return "error: " + "".join(f"{part}: " for part in parts)


def test_every_bad_recipe_file_has_a_case():
    files = {path.stem for path in (ROOT / BAD_DIR).glob("*.toml")}
    named = {Path(case.recipe).stem for case in CASES.values() if case.recipe != DEMO}
    assert files == named
    assert len(files) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_cli_reports_one_located_line(name):
    case = CASES[name]
    args = ["recipe", "validate", case.recipe, *[f"--set={s}" for s in case.sets]]
    env = {k: v for k, v in os.environ.items() if k != "PANDA_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "panda", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) in (1, 2), result.stderr
    assert lines[0].startswith(expected_prefix(case)), lines[0]
    assert case.says in lines[0]
    assert all(line.startswith("hint: ") for line in lines[1:]), result.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_library_error_has_key_and_location(name, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(ROOT)  # locations are shown relative to the path as given
    with pytest.raises(RecipeError) as caught:
        load(case.recipe, case.sets)
    assert caught.value.key == case.key
    assert caught.value.where == case.where
    assert case.says in caught.value.message
