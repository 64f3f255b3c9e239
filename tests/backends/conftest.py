"""Fixtures of the distributed-backend tests.

DeepSpeed JIT-builds a small shared-memory communication op the first time a
process group starts on the CPU (into ~/.cache/torch_extensions). Two ranks
building it at once have been seen to fail, so ``deepspeed_cpu_ops`` builds
it once, in one process, before any multi-process test starts (a no-op when
the build is cached: about 4 s; the first build takes one to two minutes).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_TESTS = Path(__file__).resolve().parents[1] / "train"
if str(TRAIN_TESTS) not in sys.path:  # the engine stand-ins (standins.py) live there
    sys.path.insert(0, str(TRAIN_TESTS))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

BUILD_SHM_OP = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """DeepSpeed importable and its CPU op built, once per session; skip without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: pip install 'pandallm[deepspeed]'")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", BUILD_SHM_OP], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"building DeepSpeed's CPU communication op failed:\n{done.stderr[-3000:]}")
    os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the ranks the tests spawn
    return True


# -- whole training runs, shared by the backend and convert tests ----------------------------

# 5 steps of 2 micro-batches; 4 sequences per micro-batch over all ranks.
LOOP_TRAIN = {"gradient_accumulation_steps": 2, "max_steps": 5, "save_every": 1, "keep_last": 5}


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory):
    """(losses, final folder) of the loop cases' training in one process: batch 4."""
    import panda.job
    from panda import recipe as recipe_io
    from standins import register_standins, standin_build_data, standin_recipe_data

    tmp = tmp_path_factory.mktemp("single")
    register_standins()
    original = panda.job.build_data
    panda.job.build_data = standin_build_data(64)
    try:
        data = standin_recipe_data(str(tmp / "run"), **{**LOOP_TRAIN, "save_every": 0,
                                                         "per_device_batch_size": 4})
        data["backend"] = {"name": "single"}
        summary = panda.job.train(recipe_io.validate(data))
    finally:
        panda.job.build_data = original
    return [step["loss"] for step in summary["history"]], tmp / "run" / "final"


def _resumed_pair(tmp, name, run):
    """The run, and the same run resumed from its own step-3 checkpoint in another folder."""
    return [{**run, "output_dir": str(tmp / name), "summary": str(tmp / f"{name}.json")},
            {**run, "output_dir": str(tmp / f"{name}-resumed"),
             "summary": str(tmp / f"{name}-resumed.json"),
             "resume": str(tmp / name / "checkpoints" / "step-00000003")}]


@pytest.fixture(scope="session")
def deepspeed_runs(tmp_path_factory, deepspeed_cpu_ops, single_process_run):
    """ZeRO 1, 2, 3 and 3 + CPU offload on 2 ranks (batch 2 each), each trained then resumed:
    (folder, reference losses, reference final folder)."""
    import torch.multiprocessing as mp

    from ds_workers import LOOP_CASES, ZERO_CASES, train_worker
    from standins import free_port

    tmp = tmp_path_factory.mktemp("deepspeed-loop")
    train = {**LOOP_TRAIN, "per_device_batch_size": 2}
    runs = [r for name in LOOP_CASES
            for r in _resumed_pair(tmp, name, {"backend": ZERO_CASES[name], "train": train})]
    mp.spawn(train_worker, args=(2, [free_port() for _ in runs], runs), nprocs=2, join=True)
    return (tmp, *single_process_run)


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory, deepspeed_cpu_ops, single_process_run):
    """ds-pipeline with 2 stages on 2 ranks (one replica, batch 4), trained then resumed."""
    import torch.multiprocessing as mp

    from ds_workers import PIPELINE, pipeline_train_worker, save_hf_folder
    from standins import free_port, tiny_llama

    tmp = tmp_path_factory.mktemp("pipeline-loop")
    model = {"path": save_hf_folder(tiny_llama(0), tmp / "hf")}
    train = {**LOOP_TRAIN, "per_device_batch_size": 4}
    runs = _resumed_pair(tmp, "run", {"model": model, "backend": PIPELINE, "train": train})
    mp.spawn(pipeline_train_worker, args=(2, [free_port() for _ in runs], runs), nprocs=2,
             join=True)
    return (tmp, *single_process_run)
