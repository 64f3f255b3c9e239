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
import time
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


def timed_steps(step: Any, batches: list[Any], warmup: int, device: str
                ) -> tuple[list[Any], float, float]:
    """``step`` over ``batches``: the first ``warmup`` untimed (compilation, allocator
    warm-up), the rest timed between device fences. Returns (losses, warm-up seconds, timed
    seconds); the timed losses may still be device tensors."""
    started = time.perf_counter()
    losses = [float(step(batch)) for batch in batches[:warmup]]
    synchronize(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    losses += [step(batch) for batch in batches[warmup:]]
    synchronize(device)
    return losses, warmup_s, time.perf_counter() - started


def panda_single_step(recipe: Any, model: Any, method: Any, device: str) -> Any:
    """panda's ``single`` backend set up around ``model`` as ``panda train`` sets it up (the
    recipe's optimizer and schedule, no data), and a one-batch step that reads each step's
    numbers on the host after the next step is queued, as the loop does (docs/training.md).
    The step returns the loss (a float or a device tensor); ``step.model`` is the model."""
    from panda import registry
    from panda.backends.base import DistInfo
    from panda.job import Job
    from panda.plugins.api import step_values_on_host

    backend = registry.get("backend", "single")(recipe.backend.options)
    job = Job(recipe=recipe, backend=backend, dist=DistInfo(device=device),
              output_dir=Path("unused"), model=model, method=method,
              optimizer_plugin=registry.get("optimizer", recipe.optim.name)(recipe.optim.options),
              schedule_plugin=registry.get("scheduler", recipe.schedule.name)(
                  recipe.schedule.options),
              total_steps=10**6)
    backend.setup(job)
    pending: list[dict[str, Any]] = []

    def step(batch: dict[str, Any]) -> Any:
        values = backend.train_step([batch])
        if pending:
            step_values_on_host(pending.pop())
        pending.append(values)
        return values["loss"]

    step.model = backend.model
    return step


def append_record(record: dict[str, Any], results: Path | None, tiny: bool) -> None:
    """One JSON line to ``results``, or to benchmarks/results.jsonl for a real (not --tiny) run."""
    target = results or (None if tiny else RESULTS)
    if target is not None:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
