"""GPU checks of the fsdp and fairscale backends (pytest -m gpu, one CUDA GPU, world size 1).

* Every configuration trains the Llama-3.2-1B shape (random init, bf16, seq 512) for a few
  steps: the loss must fall on a repeated batch; tokens/s and peak memory are printed
  (run with -s to see them) and appended to benchmarks/results.jsonl.
* FairScale's FSDP mode, which cannot run on the CPU, gets the checks the CPU tests give
  the other backends, on the tiny Llama in fp32: the same losses as ``single``, exact
  resume from its own checkpoint, and an export that computes the trained model's logits.
  So does fsdp's CPU offload, whose pinned-memory path only exists next to a GPU.

Command: ``pytest -m gpu tests/backends/test_gpu_backends.py -s``
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed_runs import PROBE, exported_logits
from panda import registry
from standins import (StandinConstant, StandinLm, collate, random_sequences, register_standins,
                      standin_recipe_data, step_loss, tiny_llama)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEQ, MICRO_BATCH, ACCUMULATION = 512, 4, 2
WARMUP_STEPS, TIMED_STEPS = 3, 5
CONFIGS = {
    "single": {"name": "single"},
    "fsdp": {"name": "fsdp"},
    "fsdp+ac+compile": {"name": "fsdp", "activation_checkpointing": True},
    "fsdp+cpu_offload": {"name": "fsdp", "cpu_offload": True},
    "fairscale-oss": {"name": "fairscale", "mode": "oss"},
    "fairscale-fsdp": {"name": "fairscale", "mode": "fsdp"},
}
COMPILED = {"fsdp+ac+compile"}


def gpu_job(tmp: Path, backend: dict[str, Any], model: Any, *, precision: str,
            batch_size: int, accumulation: int, lr: float, optimizer: str = "adamw",
            compile: bool = False) -> Any:
    """A Job with ``backend`` (a [backend] table) set up around ``model``; no data."""
    from panda import recipe as recipe_io
    from panda.job import Job

    register_standins()
    data = standin_recipe_data(str(tmp), per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, precision=precision,
                               compile=compile)
    data["optim"] = {"name": optimizer, "lr": lr, "max_grad_norm": 1.0}
    data["backend"] = backend
    recipe = recipe_io.validate(data)
    backend_plugin = registry.get("backend", backend["name"])(recipe.backend.options)
    optimizer_plugin = registry.get("optimizer", optimizer)(recipe.optim.options)
    job = Job(recipe=recipe, backend=backend_plugin, dist=backend_plugin.init_distributed(),
              output_dir=tmp, model=model, method=StandinLm(), optimizer_plugin=optimizer_plugin,
              schedule_plugin=StandinConstant(), total_steps=100)
    backend_plugin.setup(job)
    return job


# -- Llama-3.2-1B: every configuration trains; speed and memory printed --------------------------

def llama_1b() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from panda.models.presets import PRESETS

    config = LlamaConfig(**{k: v for k, v in PRESETS["llama3.2-1b"].items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute
        return LlamaForCausalLM(config).to(torch.bfloat16)


def token_batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).clone()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama32_1b_trains_on_one_gpu(name, tmp_path, record_gpu_result):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = llama_1b()
    job = gpu_job(tmp_path, CONFIGS[name], model, precision="bf16", batch_size=MICRO_BATCH,
                  accumulation=ACCUMULATION, lr=1e-4, compile=name in COMPILED)
    batch = token_batch(model.config.vocab_size)
    try:
        losses = [step_loss(job.backend, [batch] * ACCUMULATION)
                  for _ in range(WARMUP_STEPS)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            losses.append(step_loss(job.backend, [batch] * ACCUMULATION))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        job.backend.close()
    tokens = TIMED_STEPS * ACCUMULATION * MICRO_BATCH * SEQ
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n[gpu-backends] {name:18s} llama3.2-1b bf16 seq {SEQ} micro-batch {MICRO_BATCH} x "
          f"{ACCUMULATION}: {tokens / seconds:,.0f} tokens/s, peak {peak_gb:.1f} GiB, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({torch.cuda.get_device_name()})")
    record_gpu_result("gpu_backends", {
        "config": name, "model": "llama3.2-1b", "seq": SEQ, "micro_batch": MICRO_BATCH,
        "accumulation": ACCUMULATION, "tokens_per_s": round(tokens / seconds),
        "peak_gpu_gib": round(peak_gb, 2), "first_loss": losses[0], "last_loss": losses[-1]})
    assert all(loss == loss for loss in losses)  # finite
    assert losses[-1] < losses[0] - 0.5  # one batch over and over: it must be learned


# -- FairScale's FSDP mode and fsdp's CPU offload: parity, resume, export (tiny Llama, fp32) -------

SEQUENCES = random_sequences(40, seed=7)
STEPS, SAVE_AT = 5, 3
TINY = {"precision": "fp32", "batch_size": 4, "accumulation": 2, "lr": 0.05,
        "optimizer": "adamw"}


def step_batches(step: int) -> list[dict[str, torch.Tensor]]:
    start = step * 8
    return [collate(SEQUENCES[start:start + 4]), collate(SEQUENCES[start + 4:start + 8])]


def train(job: Any, steps: range) -> list[float]:
    return [step_loss(job.backend, step_batches(step)) for step in steps]


def trained_logits(job: Any) -> torch.Tensor:
    job.backend.model.eval()
    with torch.no_grad():
        return job.backend.model(input_ids=PROBE.to(job.backend.device)).logits.float().cpu()


@pytest.mark.parametrize("backend", [{"name": "fairscale", "mode": "fsdp"},
                                     {"name": "fsdp", "cpu_offload": True}],
                         ids=["fairscale-fsdp", "fsdp-cpu-offload"])
def test_tiny_llama_parity_resume_and_export(backend, tmp_path):
    reference = gpu_job(tmp_path / "single", {"name": "single"}, tiny_llama(0), **TINY)
    expected = train(reference, range(STEPS))
    job = gpu_job(tmp_path / "run", backend, tiny_llama(0), **TINY)
    losses = train(job, range(SAVE_AT))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    job.backend.save(str(checkpoint))
    losses += train(job, range(SAVE_AT, STEPS))
    # One GPU and one shard: the same sums as single, up to kernel choice.
    assert losses == pytest.approx(expected, rel=1e-5)

    resumed = gpu_job(tmp_path / "resumed", backend, tiny_llama(1), **TINY)  # other weights
    resumed.backend.load(str(checkpoint))
    assert train(resumed, range(SAVE_AT, STEPS)) == losses[SAVE_AT:]

    resumed.backend.export(str(tmp_path / "final"), None)
    torch.testing.assert_close(exported_logits(tmp_path / "final"), trained_logits(resumed),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(trained_logits(resumed), trained_logits(job), rtol=0, atol=0)
    job.backend.close()
