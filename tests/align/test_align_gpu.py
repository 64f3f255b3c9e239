"""GPU checks of the preference methods (run on a GPU host: pytest -m gpu tests/align).

* the chunked log-probs equal a plain log_softmax in bf16 on a Llama-3-sized vocabulary and
  use less memory than it;
* DPO with LoRA in bf16 trains, starts at log 2, and precompute_ref matches the live
  reference within bf16 rounding;
* with 2 GPUs: DPO (full weights) and the reward model under fsdp match ddp, and the fsdp
  reward model exports a folder AutoModelForSequenceClassification loads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@needs_gpu
def test_chunked_logps_match_log_softmax_in_bf16_with_less_memory():
    from panda.plugins.methods.token_logps import token_logps

    torch.manual_seed(0)
    rows, seq, vocab = 8, 1024, 128256
    logits = (torch.randn(rows, seq, vocab, device="cuda") * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), device="cuda")
    labels[:, :100] = -100

    def peak_extra(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        value = fn()
        value.sum().backward()
        torch.cuda.synchronize()
        grad = logits.grad.clone()
        logits.grad = None
        return value.detach(), grad, torch.cuda.max_memory_allocated() - start

    def plain():
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(targets != -100, picked, 0.0)

    ours, our_grad, our_memory = peak_extra(lambda: token_logps(logits, labels))
    theirs, their_grad, their_memory = peak_extra(plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(our_grad.float(), their_grad.float(), rtol=2e-2, atol=1e-3)
    assert our_memory < 0.5 * their_memory, (our_memory, their_memory)


def gpu_recipe(tmp_path: Path, name: str, method: str, options: str, extra: str = "",
               batch: int = 4, backend: str = "auto", dtype: str = "bfloat16",
               precision: str = "bf16") -> Path:
    fixtures = Path(__file__).resolve().parent / "fixtures"
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[run]
name = "{name}"
output_dir = "{tmp_path / 'runs' / name}"
seed = 3
[model]
preset = "tiny-llama"
dtype = "{dtype}"
[data]
max_seq_length = 64
[[data.sources]]
name = "preference"
path = "{fixtures / 'pairs.jsonl'}"
[[data.eval_sources]]
name = "preference"
path = "{fixtures / 'eval_pairs.jsonl'}"
[method]
name = "{method}"
{options}
[optim]
lr = 3e-3
max_grad_norm = 1.0
[schedule]
name = "constant"
warmup_steps = 0
[train]
per_device_batch_size = {batch}
gradient_accumulation_steps = 1
max_steps = 4
precision = "{precision}"
log_every = 1
eval_every = 4
[backend]
name = "{backend}"
[log]
tensorboard = false
{extra}
""", encoding="utf-8")
    return path


@needs_gpu
def test_dpo_lora_bf16_and_precomputed_reference(tmp_path, monkeypatch):
    from panda.job import build_job, run_job
    from panda.recipe import load

    monkeypatch.setenv("PANDA_CACHE", str(tmp_path / "cache"))
    lora = "[lora]\nr = 8\nalpha = 16\ndropout = 0.0"
    live = run_job(build_job(load(gpu_recipe(tmp_path, "live", "dpo", "beta = 0.1", lora)),
                             resume="never"))
    pre = run_job(build_job(load(gpu_recipe(tmp_path, "pre", "dpo",
                                            "beta = 0.1\nprecompute_ref = true", lora)),
                            resume="never"))
    assert math.isclose(live["history"][0]["loss"], math.log(2), rel_tol=1e-3)
    for a, b in zip(live["history"], pre["history"]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-2, abs_tol=2e-3)
    assert live["history"][-1]["loss"] < live["history"][0]["loss"]


def panda_train(recipe: Path, *extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PANDA_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "panda", "train", str(recipe), *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def curve(out: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


@needs_two
@pytest.mark.parametrize("method,options", [("dpo", "beta = 0.1"), ("rm", "")])
def test_fsdp_matches_ddp_and_exports(tmp_path, monkeypatch, method, options):
    monkeypatch.setenv("PANDA_CACHE", str(tmp_path / "cache"))
    runs = {}
    for backend in ("ddp", "fsdp"):
        recipe = gpu_recipe(tmp_path, f"{method}-{backend}", method, options, batch=2,
                            backend=backend, dtype="float32", precision="fp32")
        panda_train(recipe, "--nproc", "2")
        runs[backend] = tmp_path / "runs" / f"{method}-{backend}"
    for key in ("loss", "grad_norm", "rewards/accuracy"):
        assert curve(runs["fsdp"], key) == pytest.approx(curve(runs["ddp"], key), rel=1e-4,
                                                         abs=1e-6), key
    if method == "rm":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(runs["fsdp"] / "final")
        assert model.config.num_labels == 1
