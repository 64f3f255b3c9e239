"""GPU checks of the deepspeed backend (pytest -m gpu, one CUDA GPU, world size 1).

* ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload (optimizer and parameters, DeepSpeedCPUAdam)
  train the Llama-3.2-1B shape (random init, bf16, seq 512, AdamW) for a few steps next to
  the ``single`` backend: the loss falls on a repeated batch; tokens/s and peak GPU memory
  are printed (run with -s) and appended to benchmarks/results.jsonl.
* ZeRO-3 with CPU offload trains a ~5.5B-parameter Llama shape whose full fine-tuning state
  (bf16 weights and gradients, fp32 master weights, AdamW moments: 16 bytes a parameter)
  cannot fit in one GPU's memory without offload; the figures are printed and recorded.
  It needs about 100 GB of host RAM (fp32 master weights, gradients and AdamW moments of
  5.1B parameters live there) and builds DeepSpeedCPUAdam on first use (ninja, g++).

The pipeline backend needs one GPU per stage: it is not checked here (2 stages on 1 GPU
is not a configuration DeepSpeed supports).

Command (an H100): ``pytest -m gpu tests/backends/test_gpu_deepspeed.py -s``
"""

from __future__ import annotations

import gc
import importlib.util
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from panda import registry
from standins import StandinConstant, StandinLm, register_standins, standin_recipe_data

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs DeepSpeed: pip install 'pandallm[deepspeed]'")]

SEQ, MICRO_BATCH, ACCUMULATION = 512, 4, 2
WARMUP_STEPS, TIMED_STEPS = 3, 5
CONFIGS = {
    "single": {"name": "single"},
    "deepspeed-zero2": {"name": "deepspeed", "zero_stage": 2},
    "deepspeed-zero3": {"name": "deepspeed", "zero_stage": 3},
    "deepspeed-zero3+cpu-offload": {"name": "deepspeed", "zero_stage": 3,
                                    "offload_optimizer": "cpu", "offload_params": "cpu"},
}
# Llama-shaped, 5.5B parameters: 16 bytes each without offload is 82 GiB, over an H100's 79
# (24 layers, 5.1B, would need 76 GiB: it fits, and the test would skip). With offload the host
# holds ~18 bytes a parameter, ~100 GB of a 128 GiB GPU host.
LARGE_SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 26,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
               "max_position_embeddings": 4096, "tie_word_embeddings": False}
BYTES_PER_PARAMETER = 2 + 2 + 4 + 8  # bf16 weight + bf16 grad + fp32 master + AdamW moments


def gpu_job(tmp: Path, backend: dict[str, Any], model: Any, *, batch_size: int,
            accumulation: int, lr: float = 1e-4) -> Any:
    """A Job with ``backend`` set up around ``model`` (bf16, AdamW); no data."""
    from panda import recipe as recipe_io
    from panda.job import Job

    register_standins()
    data = standin_recipe_data(str(tmp), per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, precision="bf16")
    data["optim"] = {"name": "adamw", "lr": lr, "max_grad_norm": 1.0}
    data["backend"] = backend
    recipe = recipe_io.validate(data)
    plugin = registry.get("backend", backend["name"])(recipe.backend.options)
    optimizer = registry.get("optimizer", "adamw")(recipe.optim.options)
    job = Job(recipe=recipe, backend=plugin, dist=plugin.init_distributed(), output_dir=tmp,
              model=model, method=StandinLm(), optimizer_plugin=optimizer,
              schedule_plugin=StandinConstant(), total_steps=100)
    plugin.setup(job)
    return job


def llama(fields: dict[str, Any], device: str = "cuda") -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        return LlamaForCausalLM(config).to(torch.bfloat16)


def llama_1b() -> Any:
    from panda.models.presets import PRESETS

    return llama({k: v for k, v in PRESETS["llama3.2-1b"].items() if k != "model_type"})


def token_batch(vocab: int, batch: int = MICRO_BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(),
            "position_ids": torch.arange(SEQ).expand(batch, SEQ).clone()}


def timed_steps(job: Any, batch: dict, accumulation: int, warmup: int, timed: int
                ) -> tuple[list[float], float]:
    losses = [job.backend.train_step([batch] * accumulation)["loss"] for _ in range(warmup)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(timed):
        losses.append(job.backend.train_step([batch] * accumulation)["loss"])
    torch.cuda.synchronize()
    return losses, time.perf_counter() - start


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama32_1b_trains_on_one_gpu(name, tmp_path, record_gpu_result):
    gc.collect()  # the previous configuration's engine and model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = llama_1b()
    job = gpu_job(tmp_path, CONFIGS[name], model, batch_size=MICRO_BATCH,
                  accumulation=ACCUMULATION)
    try:
        losses, seconds = timed_steps(job, token_batch(model.config.vocab_size), ACCUMULATION,
                                      WARMUP_STEPS, TIMED_STEPS)
    finally:
        job.backend.close()
    tokens_per_s = TIMED_STEPS * ACCUMULATION * MICRO_BATCH * SEQ / seconds
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n[gpu-deepspeed] {name:28s} llama3.2-1b bf16 seq {SEQ} micro-batch {MICRO_BATCH} "
          f"x {ACCUMULATION}: {tokens_per_s:,.0f} tokens/s, peak {peak_gb:.1f} GiB, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({torch.cuda.get_device_name()})")
    record_gpu_result("gpu_deepspeed", {
        "config": name, "model": "llama3.2-1b", "seq": SEQ, "micro_batch": MICRO_BATCH,
        "accumulation": ACCUMULATION, "tokens_per_s": round(tokens_per_s),
        "peak_gpu_gib": round(peak_gb, 2), "first_loss": losses[0], "last_loss": losses[-1]})
    assert all(loss == loss for loss in losses)  # finite
    assert losses[-1] < losses[0] - 0.5  # one batch over and over: it must be learned


def test_zero3_cpu_offload_trains_a_model_that_does_not_fit_without_it(tmp_path,
                                                                      record_gpu_result):
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    model = llama(LARGE_SHAPE)
    torch.cuda.reset_peak_memory_stats()  # from here on: what training takes
    parameters = sum(p.numel() for p in model.parameters())
    needed_gib = parameters * BYTES_PER_PARAMETER / 2**30
    if needed_gib <= total_gib:
        pytest.skip(f"this GPU ({total_gib:.0f} GiB) would hold the {needed_gib:.0f} GiB "
                    "of training state without offload")
    backend = {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
               "offload_params": "cpu", "pin_memory": False}  # ~90 GB of host state
    job = gpu_job(tmp_path, backend, model, batch_size=1, accumulation=1, lr=1e-4)
    try:
        losses, seconds = timed_steps(job, token_batch(LARGE_SHAPE["vocab_size"], batch=1), 1,
                                      warmup=1, timed=2)
    finally:
        job.backend.close()
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n[gpu-deepspeed] zero3+cpu-offload {parameters / 1e9:.2f}B parameters: "
          f"{needed_gib:.0f} GiB of training state without offload > {total_gib:.0f} GiB of GPU; "
          f"with offload peak GPU {peak_gb:.1f} GiB, peak host RSS {host_gb:.0f} GiB, "
          f"{2 * SEQ / seconds:,.0f} tokens/s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    record_gpu_result("gpu_deepspeed", {
        "config": "deepspeed-zero3+cpu-offload-large", "parameters": parameters,
        "state_without_offload_gib": round(needed_gib, 1), "gpu_total_gib": round(total_gib),
        "peak_gpu_gib": round(peak_gb, 2), "peak_host_rss_gib": round(host_gb, 1),
        "tokens_per_s": round(2 * SEQ / seconds), "seq": SEQ, "micro_batch": 1})
    assert all(loss == loss for loss in losses)
    assert peak_gb < total_gib
