"""recipes/llama65b-qlora.toml through `panda train` on one GPU, without the weights.

The recipe is taken as shipped, with what a measurement needs instead of files we do not
have: ``model.preset = "llama-65b"`` (LLaMA-65B's shape and 32000-token vocabulary,
random init, built directly in 4-bit one block at a time) instead of ``model.path``, the
tiny tokenizer, synthetic instruction records, and a few optimizer steps. Everything
else (LoRA r=64 on every linear layer, NF4 with double quantization, gradient
checkpointing, seq 2048, micro-batch 1, bf16, the single backend) is the recipe's.

On CPU the derived recipe must validate; with `pytest -m gpu` (a CUDA GPU with
bitsandbytes) `panda train` runs it, and its peak memory and tokens/s from
metrics.jsonl are printed (-s) and appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import pytest

from lora_models import TOKENIZER_DIR
from panda import recipe as recipe_io
from panda.recipe import read_recipe
from panda.toml_io import dumps

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "llama65b-qlora.toml"
STEPS, ACCUMULATION = 3, 4


def measurement_recipe(tmp: Path) -> Path:
    """The shipped recipe with a preset shape, synthetic data and a few steps, as a file."""
    data, _ = read_recipe(RECIPE)
    del data["model"]["path"]
    data["model"].update(preset="llama-65b", vocab_size=32000)
    data["tokenizer"] = {"path": str(TOKENIZER_DIR)}
    data["data"]["sources"] = [{"name": "instruction", "path": str(instruction_records(tmp))}]
    data["train"].update(max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION,
                         save_every=0, log_every=1)
    data["run"].update(output_dir=str(tmp / "run"))
    path = tmp / "llama65b-qlora-measure.toml"
    path.write_text(dumps(data), encoding="utf-8")
    return path


def instruction_records(tmp: Path, count: int = 120) -> Path:
    rng = random.Random(0)
    words = [str(n) for n in range(100)]
    path = tmp / "records.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            text = lambda n: " + ".join(rng.choice(words) for _ in range(n))  # noqa: E731
            handle.write(json.dumps({"input": text(60), "target": text(120)}) + "\n")
    return path


def test_the_measurement_recipe_validates(tmp_path):
    recipe = recipe_io.load(measurement_recipe(tmp_path))
    assert (recipe.model.options.preset, recipe.lora.r, recipe.quant.bits) == ("llama-65b", 64, 4)
    assert recipe.data.max_seq_length == 2048 and recipe.train.per_device_batch_size == 1


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: pip install 'pandallm[quant]'")
def test_llama65b_qlora_recipe_trains_on_one_gpu(tmp_path, train_metrics, record_gpu_result):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    started = time.perf_counter()
    steps = train_metrics(measurement_recipe(tmp_path), tmp_path / "run")
    wall = time.perf_counter() - started
    last = steps[-1]
    peak = max(s["peak_mem_gb"] for s in steps)
    print(f"\n[llama65b-qlora] {torch.cuda.get_device_name()}: {STEPS} steps x {ACCUMULATION} "
          f"micro-batches of 2048 tokens, {last['tokens_per_s']:,.0f} tok/s (last step), "
          f"peak {peak:.1f} GiB, loss {steps[0]['loss']:.3f} -> {last['loss']:.3f}, "
          f"panda train wall {wall:.0f} s")
    record_gpu_result("llama65b_qlora_recipe", {
        "settings": "recipes/llama65b-qlora.toml with model.preset=llama-65b (vocab 32000, "
                    f"random init), {STEPS} steps x {ACCUMULATION} micro-batches",
        "tokens_per_s": round(last["tokens_per_s"]), "peak_mem_gib": round(peak, 2),
        "first_loss": steps[0]["loss"], "last_loss": last["loss"], "wall_s": round(wall)})
    assert peak < torch.cuda.get_device_properties(0).total_memory / 2**30
