"""Run the real ``panda`` CLI in this process with the engine stand-ins registered.

Used by subprocess tests (kill -9, interrupted saves, torchrun). Environment:
STANDIN_STEP_SLEEP=seconds slows every step so a test can kill at a chosen point;
STANDIN_KILL_IN_SAVE=N SIGKILLs this process in the middle of the save of step N
(files written, folder not yet renamed into place).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import panda.job  # noqa: E402
import panda.train.checkpoint as checkpoint  # noqa: E402
from panda import registry  # noqa: E402
from standins import StandinLm, register_standins, standin_build_data  # noqa: E402


class NoisyLm(StandinLm):
    """Draws from torch, python and numpy generators every step, so a resume that did not
    restore all three RNG states would train differently."""

    def loss(self, model, batch):
        total, count, extra = super().loss(model, batch)
        noise = torch.rand(()) + random.random() + float(np.random.rand())
        return total * (1 + 1e-3 * noise), count, extra

    def units(self, batch):
        delay = float(os.environ.get("STANDIN_STEP_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        return super().units(batch)


def kill_in_save(step: int) -> None:
    original = checkpoint.fsync_tree

    def fsync_then_die(folder):
        original(folder)
        if folder.name == f".{checkpoint.checkpoint_name(step)}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.fsync_tree = fsync_then_die


def main() -> None:
    register_standins()
    registry.register("method", "standin-lm", NoisyLm)
    panda.job.build_data = standin_build_data(int(os.environ.get("STANDIN_SEQUENCES", "64")))
    if os.environ.get("STANDIN_KILL_IN_SAVE"):
        kill_in_save(int(os.environ["STANDIN_KILL_IN_SAVE"]))
    torch.set_num_threads(1)
    from panda.cli import main as panda_main

    sys.argv = ["panda", *sys.argv[1:]]
    panda_main()


if __name__ == "__main__":
    main()
