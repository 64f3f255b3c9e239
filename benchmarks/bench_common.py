"""What the training benchmarks share: the device, timing fences, versions, the results file.

Imported by the scripts next to it (``python benchmarks/NAME.py`` puts this folder on
``sys.path``; a script loaded by path inserts it itself).
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"


def pick_device(tiny: bool) -> str:
    """``cuda:0`` when there is a GPU; the CPU only for a --tiny harness check."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    if not tiny:
        sys.exit("no CUDA GPU here: run with --tiny to check the harness on a CPU")
    return "cpu"


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    """Free what the previous variant left, and restart the peak-memory counter."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def versions(*packages: str) -> dict[str, str]:
    """Python, torch (and its CUDA), transformers, panda, and each of ``packages`` installed."""
    import torch
    import transformers

    import panda

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
             "panda": panda.__version__}
    for name in packages:
        if importlib.util.find_spec(name) is not None:
            found[name] = getattr(__import__(name), "__version__", "unknown")
    return found


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_like_the_loop(train_step: Any) -> Any:
    """A one-batch step for panda's ``backend.train_step`` that reads each step's numbers
    on the host after the next step is queued, as ``panda train``'s loop does (see
    docs/training.md); it returns the loss, a float or a device tensor."""
    from panda.plugins.api import step_values_on_host

    pending: list[dict[str, Any]] = []

    def step(batch: dict[str, Any]) -> Any:
        values = train_step([batch])
        if pending:
            step_values_on_host(pending.pop())
        pending.append(values)
        return values["loss"]

    return step


def append_record(record: dict[str, Any], results: Path | None, tiny: bool) -> None:
    """One JSON line to ``results``, or to benchmarks/results.jsonl for a real (not --tiny) run."""
    target = results or (None if tiny else RESULTS)
    if target is not None:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
