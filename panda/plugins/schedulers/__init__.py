"""Built-in learning-rate schedules, and how the trainer turns one into a torch scheduler.

Convention shared by every schedule: ``factor(step, total_steps, warmup_steps)``
is the multiplier of the peak ``optim.lr`` used by optimizer update number
``step`` (0-based). Warm-up is linear from 0: update ``s < warmup_steps`` uses
``s / warmup_steps`` (so the first update of a warm-up runs at lr 0, as in
Hugging Face's and DeepSpeed's schedulers), then the schedule's own shape runs
over the remaining ``total_steps - warmup_steps`` updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from panda.plugins.api import SchedulerPlugin
    from panda.recipe_schema import ScheduleSection


def resolve_warmup_steps(schedule: "ScheduleSection", total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``warmup_proportion`` of the run when set, else ``warmup_steps``.

    The proportion is rounded down, as PandaLLM did (``int(t_total * warmup_proportion)``).
    """
    if schedule.warmup_proportion > 0:
        return int(total_steps * schedule.warmup_proportion)
    return schedule.warmup_steps


def make_lr_scheduler(optimizer: "torch.optim.Optimizer", schedule: "SchedulerPlugin",
                      total_steps: int, warmup_steps: int) -> "torch.optim.lr_scheduler.LambdaLR":
    """A ``LambdaLR`` applying ``schedule.factor`` to each group's lr; call ``.step()`` after each update.

    Its ``state_dict`` holds the step count, so a resumed run continues the curve.
    """
    from torch.optim.lr_scheduler import LambdaLR

    def lr_lambda(step: int) -> float:
        return schedule.factor(step, total_steps, warmup_steps)

    return LambdaLR(optimizer, lr_lambda)


def linear_warmup(step: int, warmup_steps: int) -> float | None:
    """``step / warmup_steps`` during warm-up, ``None`` once it is over."""
    if step < warmup_steps:
        return step / warmup_steps
    return None


def decay_progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """How far past warm-up this step is, from 0 (first step after it) to 1 (``total_steps``)."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min(1.0, max(0.0, progress))
