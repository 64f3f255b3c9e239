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
