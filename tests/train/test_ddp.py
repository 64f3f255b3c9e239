"""DDP on CPU: `panda train --nproc 2` (torch.distributed.run, 2 gloo processes) follows the
single-process loss curve at the same global batch, and resumes from its own checkpoint.
Real CLI, real data pipeline and plugins (the demo recipe, shortened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = ("--set", "train.log_every=1", "--set", "train.eval_every=3", "--set",
          "train.save_every=3", "--set", "schedule.name=constant", "--set",
          "schedule.warmup_steps=0")


def run_panda(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PANDA_DEBUG"}
    return subprocess.run([sys.executable, "-m", "panda", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def train(out: Path, *extra: str, steps: int = STEPS, batch: int = 4):
    result = run_panda("train", "recipes/demo.toml", "--set", f"run.output_dir={out}",
                       "--set", f"train.max_steps={steps}", "--set",
                       f"train.per_device_batch_size={batch}", *COMMON, *extra)
    assert result.returncode == 0, result.stderr
    return result


def curve(out: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(out)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = train(out, "--nproc", "2", batch=2)
    return out, result


def test_two_gloo_processes_match_single_process_curve(single, ddp):
    out, result = ddp
    assert "--nproc-per-node" not in result.stdout  # torchrun ran quietly; our lines only
    for key in ("loss", "grad_norm", "eval_loss"):
        assert curve(out, key) == pytest.approx(curve(single, key), rel=1e-5), key
    assert len(curve(out, "loss")) == STEPS
    assert curve(out, "tokens_seen") == curve(single, "tokens_seen")  # both count all ranks
    reference = weights(single)
    for name, value in weights(out).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)


def test_ddp_resumes_from_its_own_checkpoint(tmp_path, ddp):
    full, _ = ddp
    out = tmp_path / "run"
    train(out, "--nproc", "2", steps=3, batch=2)
    resumed = train(out, "--nproc", "2", batch=2)
    assert "resumed from" in resumed.stdout
    assert curve(out, "loss") == curve(full, "loss")
    reference = weights(full)
    for name, value in weights(out).items():
        assert torch.equal(value, reference[name]), name
