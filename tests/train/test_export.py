"""Export: the HF folder under <output_dir>/final loads with AutoModelForCausalLM and gives
the trained model's logits; bf16 runs keep fp32 master weights and export in bf16."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from panda.models import tiny_tokenizer
from standins import backend_job, collate, random_sequences, tiny_llama

BATCH = collate(random_sequences(4, seed=5))


def train_a_little(job, steps=3):
    for _ in range(steps):
        job.backend.train_step([BATCH])


def test_exported_folder_loads_with_equal_logits(tmp_path):
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1)
    train_a_little(job)
    job.backend.export(str(tmp_path / "final"), tiny_tokenizer.load())
    folder = tmp_path / "final"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    trained = job.backend.unwrapped.eval()
    assert trained.config.use_cache is False  # off while training (packed documents)
    assert loaded.config.use_cache is True  # the exported model generates with a cache
    with torch.no_grad():
        expected = trained(input_ids=BATCH["input_ids"]).logits
        got = loaded(input_ids=BATCH["input_ids"]).logits
    assert torch.equal(got, expected)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("7+5=")["input_ids"] == tiny_tokenizer.load()("7+5=")["input_ids"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_bf16_keeps_fp32_master_weights_and_exports_bf16(tmp_path):
    model = tiny_llama(0).to(torch.bfloat16)
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1, precision="bf16",
                      model=model)
    assert all(p.dtype == torch.float32 for p in job.backend.unwrapped.parameters())
    start = {k: v.clone() for k, v in job.backend.unwrapped.state_dict().items()}
    train_a_little(job)
    # fp32 masters absorb updates that bf16 weights would round away
    changed = job.backend.unwrapped.model.norm.weight - start["model.norm.weight"]
    assert changed.abs().max() > 0
    job.backend.export(str(tmp_path / "final"), tiny_tokenizer.load())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.dtype == torch.bfloat16
    for name, value in job.backend.unwrapped.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.to(torch.bfloat16),
                                   rtol=0, atol=0)


def test_fp16_uses_a_grad_scaler_and_trains(tmp_path):
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1, precision="fp16")
    assert job.backend.scaler is not None
    losses = [job.backend.train_step([BATCH])["loss"] for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert job.backend.scaler.get_scale() > 0
