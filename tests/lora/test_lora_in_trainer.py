"""`panda train` with [lora]: only adapters learn, the export is a peft folder, resume is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import panda
from panda.plugins.models.hf import HFModel
from panda.recipe import load

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
[run]
name = "lora"
output_dir = "{out}"
seed = 7

[model]
preset = "tiny-llama"
dtype = "float32"

[data]
max_seq_length = 64

[[data.sources]]
name = "instruction"
path = "{data}"

[method]
name = "sft"

[optim]
lr = 1e-2

[schedule]
name = "constant"
warmup_steps = 0

[train]
per_device_batch_size = 4
gradient_accumulation_steps = 1
max_steps = 4
precision = "fp32"
save_every = 2
keep_last = 3
log_every = 1

[lora]
r = 4
alpha = 8
dropout = 0.0

[log]
tensorboard = false
"""


def write_recipe(tmp_path: Path, name: str) -> Path:
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(out=tmp_path / name,
                                    data=ROOT / "recipes" / "data" / "demo_train.jsonl"))
    return recipe


def base_model(recipe_path: Path) -> torch.nn.Module:
    """The preset base, rebuilt from the recipe's seed: what the adapter was trained on."""
    recipe = load(recipe_path)
    plugin = HFModel(recipe.model.options)
    return plugin.build(recipe), plugin.tokenizer(recipe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-run")
    recipe = write_recipe(tmp, "run")
    summary = panda.train(str(recipe))
    return recipe, summary


def test_export_is_a_peft_adapter_and_only_adapters_changed(trained):
    recipe, summary = trained
    final = Path(summary["final"])
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), \
        "lora_B starts at zero: training must have moved it"
    # The base weights in the last checkpoint equal a fresh build of the base: frozen.
    base, _ = base_model(recipe)
    checkpoint = max((Path(summary["output_dir"]) / "checkpoints").iterdir())
    saved = load_file(checkpoint / "model.safetensors")
    fresh = base.state_dict()
    base_keys = [k for k in saved if "lora_" not in k]
    assert base_keys
    for key in base_keys:
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(saved[key], fresh[name], rtol=0, atol=0)


def test_adapter_loads_with_peft_and_gives_the_trained_logits(trained):
    recipe, summary = trained
    base, tokenizer = base_model(recipe)
    model = PeftModel.from_pretrained(base, summary["final"]).eval()
    ids = torch.tensor([tokenizer("3 + 4 =")["input_ids"]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain), "the adapter must change the outputs"
    # The same adapter re-applied in the trainer's layout (checkpoint weights) agrees.
    checkpoint = max((Path(summary["output_dir"]) / "checkpoints").iterdir())
    saved = load_file(checkpoint / "model.safetensors")
    for key, value in load_file(Path(summary["final"]) / "adapter_model.safetensors").items():
        stored = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(saved[stored], value)


def test_resume_from_the_middle_gives_the_same_adapter(trained, tmp_path):
    recipe, summary = trained
    # A second run stopped after its step-2 checkpoint: copy the first run's step 2 only.
    resumed_dir = tmp_path / "run"
    checkpoints = Path(summary["output_dir"]) / "checkpoints"
    step2 = next(p for p in checkpoints.iterdir() if p.name.endswith("2"))
    shutil.copytree(step2, resumed_dir / "checkpoints" / step2.name)
    recipe2 = write_recipe(tmp_path, "run")
    result = panda.train(str(recipe2), resume="auto")
    assert result["step"] == 4
    first = load_file(Path(summary["final"]) / "adapter_model.safetensors")
    second = load_file(Path(result["final"]) / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6)


SHARDED_LORA = {  # backend table of each 2-rank case
    "zero3-built-partitioned": 'name = "deepspeed"\nzero_stage = 3\nzero_init = true',
    "zero3-built-whole": 'name = "deepspeed"\nzero_stage = 3\nzero_init = false',
    "fsdp": 'name = "fsdp"',  # rank 1 starts empty (load_on_rank0 "auto")
    "ddp": 'name = "ddp"',
}


@pytest.mark.parametrize("case", list(SHARDED_LORA))
def test_lora_on_two_ranks_matches_one_process(tmp_path, case):
    """2 gloo ranks x 4 == one process x 8: losses and the exported adapter, under ZeRO-3
    with the base built partitioned (zero.Init, loading the checkpoint into the shards; that
    it is partitioned is checked in tests/backends/test_deepspeed_zero_init.py) or whole,
    under FSDP2 and under DDP. (lora dropout 0: dropout masks come from per-rank generators
    and cannot agree.)"""
    import os
    import subprocess
    import sys

    if case.startswith("zero3"):
        pytest.importorskip("deepspeed")
    single = write_recipe(tmp_path, "single")
    model, tokenizer = base_model(single)  # one checkpoint: both runs load the same weights
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    text = single.read_text().replace("max_steps = 4", "max_steps = 3").replace(
        "save_every = 2", "save_every = 0").replace(
        'preset = "tiny-llama"', f'path = "{tmp_path / "base"}"')
    single.write_text(text.replace("per_device_batch_size = 4", "per_device_batch_size = 8"))
    sharded = tmp_path / "sharded.toml"
    sharded.write_text(text.replace(str(tmp_path / "single"), str(tmp_path / "sharded"))
                       + f"\n[backend]\n{SHARDED_LORA[case]}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for recipe, extra in ((single, []), (sharded, ["--nproc", "2"])):
        result = subprocess.run([sys.executable, "-m", "panda", "train", str(recipe), *extra],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl")
               .read_text().splitlines() if '"loss"' in line] for run in ("single", "sharded")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    first = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    second = load_file(tmp_path / "sharded" / "final" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    # One process folds the frozen LM head into the loss ((softmax - onehot) @ W, then the
    # per-token scale); a sharded head cannot be folded (scale, then @ W): the same gradient
    # summed in another order, a few fp32 ulps apart after the steps.
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=3e-5)
