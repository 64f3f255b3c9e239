"""Exact resume (DESIGN section 6, issue 5 acceptance): a run killed with SIGKILL after its
step-15 checkpoint and resumed with --resume auto ends with the same weights, bit for bit,
and logs the same losses as a run never interrupted; a save killed midway leaves the
previous checkpoint in charge. Real subprocesses through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from panda.toml_io import dumps
from panda.train.checkpoint import complete_checkpoints, read_trainer_state
from standins import standin_recipe_data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 30


def write_recipe(tmp_path: Path, name: str, **train) -> Path:
    data = standin_recipe_data(str(tmp_path / name), max_steps=STEPS, save_every=5,
                               keep_last=3, gradient_accumulation_steps=2, **train)
    data["optim"]["lr"] = 0.02
    path = tmp_path / f"{name}.toml"
    path.write_text(dumps(data))
    return path


def panda_cmd(*args: str) -> list[str]:
    return [sys.executable, str(HERE / "standin_cli.py"), *args]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    out.pop("PANDA_DEBUG", None)
    return out


def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(panda_cmd(*args), cwd=ROOT, env=env(**extra), capture_output=True,
                          text=True, timeout=240)


def losses_after(run_dir: Path, step: int) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "loss", "grad_norm", "lr", "tokens_seen", "epoch")
    return [{k: r[k] for k in keep} for r in records if "loss" in r and r["step"] > step]


def assert_same_final_weights(a: Path, b: Path) -> None:
    left = load_file(a / "final" / "model.safetensors")
    right = load_file(b / "final" / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name  # bitwise


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(tmp, "run")
    done = run("train", str(recipe))
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def test_kill_9_then_resume_auto_matches_uninterrupted_run(tmp_path, uninterrupted):
    recipe = write_recipe(tmp_path, "run")
    run_dir = tmp_path / "run"
    process = subprocess.Popen(panda_cmd("train", str(recipe)), cwd=ROOT,
                               env=env(STANDIN_STEP_SLEEP="0.15"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step-00000015" / "trainer_state.json").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = complete_checkpoints(run_dir)[-1]
    assert read_trainer_state(killed_at)["step"] == 15
    assert not (run_dir / "final").exists()

    resumed = run("train", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000015" in resumed.stdout
    assert_same_final_weights(run_dir, uninterrupted)
    assert losses_after(run_dir, 15) == losses_after(uninterrupted, 15)
    assert len(losses_after(run_dir, 15)) == STEPS - 15  # no step logged twice


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path, uninterrupted):
    recipe = write_recipe(tmp_path, "run")
    run_dir = tmp_path / "run"
    killed = run("train", str(recipe), STANDIN_KILL_IN_SAVE="20")
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / ".step-00000020.tmp").is_dir()  # the half-done save
    assert [p.name for p in complete_checkpoints(run_dir)] == [
        "step-00000005", "step-00000010", "step-00000015"]

    resumed = run("train", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000015" in resumed.stdout
    assert not (run_dir / "checkpoints" / ".step-00000020.tmp").exists()
    assert_same_final_weights(run_dir, uninterrupted)


def test_sigterm_saves_and_prints_the_resume_command(tmp_path, uninterrupted):
    recipe = write_recipe(tmp_path, "run")
    run_dir = tmp_path / "run"
    process = subprocess.Popen(panda_cmd("train", str(recipe)), cwd=ROOT,
                               env=env(STANDIN_STEP_SLEEP="0.15"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step-00000005").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    stopped = complete_checkpoints(run_dir)[-1]
    step = read_trainer_state(stopped)["step"]
    assert 5 <= step < STEPS
    assert f"resume with: panda train {recipe} --resume auto" in out

    resumed = run("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final_weights(run_dir, uninterrupted)


def test_non_empty_output_dir_without_checkpoint_exits_2(tmp_path):
    recipe = write_recipe(tmp_path, "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    refused = run("train", str(recipe))
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: output_dir {tmp_path / 'run'} is not empty and holds no checkpoint to resume",
        "hint: add --overwrite to replace it, or write elsewhere with --set run.output_dir=..."]
