"""`panda train` itself on one GPU for the backends the other GPU tests drive in-process
(ddp over NCCL, ds-pipeline, and DeepSpeed ZeRO-3 building the model partitioned from a
checkpoint): the Llama-3.2-1B shape (random init, tiny tokenizer, vocabulary 128256), bf16,
seq 512, a few steps of synthetic text. Tokens/s and peak memory come from
metrics.jsonl, are printed (-s) and appended to benchmarks/results.jsonl.

Command: ``pytest -m gpu tests/backends/test_gpu_panda_train.py -s``
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from panda.toml_io import dumps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "panda" / "assets" / "tokenizer-tiny"
BACKENDS = {"ddp": {"name": "ddp"}, "ds-pipeline": {"name": "ds-pipeline", "num_stages": 1},
            # zero_init "auto" with model.path: transformers builds it inside zero.Init
            "zero3-checkpoint": {"name": "deepspeed", "zero_stage": 3}}
PRESET = {"preset": "llama3.2-1b", "vocab_size": 128256, "dtype": "bfloat16"}
STEPS = 8


def synthetic_text(tmp: Path, count: int = 400) -> Path:
    rng = random.Random(0)
    path = tmp / "text.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            words = " ".join(str(rng.randrange(1000)) for _ in range(300))
            handle.write(json.dumps({"text": words}) + "\n")
    return path


def checkpoint(tmp: Path) -> dict:
    """The preset's random weights saved as a checkpoint; the [model] table that loads it."""
    from transformers import AutoModelForCausalLM

    from panda.models.loading import preset_config
    from panda.models.presets import PRESETS

    config = preset_config(PRESETS[PRESET["preset"]], vocab_size=PRESET["vocab_size"],
                           special_tokens={})
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp / "checkpoint")
    del model
    torch.cuda.empty_cache()
    return {"path": str(tmp / "checkpoint"), "dtype": "bfloat16"}


def recipe(tmp: Path, backend: dict, model: dict = PRESET) -> Path:
    data = {"run": {"name": "gpu-" + backend["name"], "output_dir": str(tmp / "run")},
            "model": model,
            "tokenizer": {"path": str(TOKENIZER)},
            "data": {"max_seq_length": 512,
                     "sources": [{"name": "text", "path": str(synthetic_text(tmp))}]},
            "method": {"name": "pretrain"}, "optim": {"name": "adamw", "lr": 1e-4},
            "train": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                      "max_steps": STEPS, "log_every": 1, "precision": "bf16"},
            "backend": backend}
    path = tmp / "recipe.toml"
    path.write_text(dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", list(BACKENDS))
def test_panda_train_runs_the_backend_on_one_gpu(name, tmp_path, train_metrics,
                                                 record_gpu_result):
    if BACKENDS[name]["name"] != "ddp" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed: pip install 'pandallm[deepspeed]'")
    model = checkpoint(tmp_path) if name == "zero3-checkpoint" else PRESET
    steps = train_metrics(recipe(tmp_path, BACKENDS[name], model), tmp_path / "run",
                          "--nproc", "1")
    tokens_per_s = sorted(s["tokens_per_s"] for s in steps[1:])[len(steps[1:]) // 2]  # median
    peak = max(s["peak_mem_gb"] for s in steps)
    print(f"\n[gpu-panda-train] {name:12s} llama3.2-1b bf16 seq 512 micro-batch 4 x 2: "
          f"{tokens_per_s:,.0f} tokens/s (median after step 1), peak {peak:.1f} GiB, "
          f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} "
          f"({torch.cuda.get_device_name()})")
    record_gpu_result("gpu_panda_train", {
        "config": name, "model": "llama3.2-1b", "seq": 512, "micro_batch": 4,
        "accumulation": 2, "steps": STEPS, "tokens_per_s": round(tokens_per_s),
        "peak_gpu_gib": round(peak, 2), "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"]})
    assert steps[-1]["loss"] < steps[0]["loss"]
