"""train.compile and the GPU paths. CPU: compile is applied in place (checkpoint keys stay
the model's own). GPU (pytest -m gpu): bf16 with fused AdamW, compile vs eager, NCCL DDP,
and the demo's accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from panda import registry
from standins import backend_job, collate, random_sequences, step_loss, tiny_llama

BATCH = collate(random_sequences(4, seed=5))


def test_compile_is_applied_in_place_before_wrapping(tmp_path, monkeypatch):
    model = tiny_llama(0)
    calls = []
    monkeypatch.setattr(model, "compile", lambda *a, **k: calls.append((a, k)))
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1, compile=True,
                      model=model)
    assert calls == [((), {})]
    assert set(job.backend.unwrapped.state_dict()) == set(tiny_llama(0).state_dict())


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def adamw():
    plugin = registry.get("optimizer", "adamw")
    return plugin(plugin.Options())


@gpu
@needs_cuda
def test_bf16_on_gpu_uses_fused_adamw_and_fp32_masters(tmp_path):
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1, precision="bf16",
                      model=tiny_llama(0).to(torch.bfloat16), optimizer=adamw(), lr=1e-3)
    assert job.dist.device.startswith("cuda")
    assert job.backend.optimizer.defaults.get("fused") is True
    assert all(p.dtype == torch.float32 and p.is_cuda for p in job.backend.trainable)
    losses = [step_loss(job.backend, [BATCH]) for _ in range(10)]
    assert losses[-1] < losses[0]


@gpu
@needs_cuda
def test_compiled_training_follows_eager_on_gpu(tmp_path):
    curves = []
    for compile in (False, True):
        job = backend_job(str(tmp_path / str(compile)), "single", batch_size=4, accumulation=2,
                          compile=compile)
        curves.append([step_loss(job.backend, [BATCH, BATCH]) for _ in range(5)])
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)


@gpu
@needs_cuda
def test_ddp_over_nccl_runs_on_one_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    job = backend_job(str(tmp_path), "ddp", batch_size=4, accumulation=2)
    single = backend_job(str(tmp_path / "s"), "single", batch_size=4, accumulation=2)
    torch_dist = __import__("torch.distributed", fromlist=["get_backend"])
    assert torch_dist.get_backend() == "nccl"
    for _ in range(3):
        a = step_loss(job.backend, [BATCH, BATCH])
        b = step_loss(single.backend, [BATCH, BATCH])
        assert a == pytest.approx(b, rel=1e-4)
    job.backend.close()


@gpu
@needs_cuda
def test_demo_on_gpu_reaches_the_cpu_threshold(tmp_path, run_panda):
    out = tmp_path / "demo"
    result = run_panda("train", "recipes/demo.toml", "--set", f"run.output_dir={out}",
                       "--set", "train.max_steps=150")
    assert result.returncode == 0, result.stderr
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    # The CPU run of this command ends at eval_loss 0.374 (fp32); on one H100 it was 0.377.
    assert evals[-1]["eval_loss"] < 0.45
