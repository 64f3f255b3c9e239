"""``warmup``: PandaLLM's default schedule, DeepSpeed's ``WarmupDecayLR``."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from panda.plugins.api import Options
from panda.plugins.schedulers.decay import Linear


class WarmupOptions(Options):
    warmup_type: Literal["linear", "log"] = Field(
        "linear", description="Shape of the warm-up: linear (what PandaLLM's recipes set) or "
        "log (DeepSpeed's own default).")


class Warmup(Linear):
    """PandaLLM's default: linear warm-up to the peak rate, then linear decay to 0.

    PandaLLM trained through DeepSpeed with ``scheduler.type = "WarmupDecayLR"``,
    ``warmup_type = "linear"``, ``warmup_min_lr = 0``, ``warmup_max_lr = lr``,
    ``warmup_num_steps = int(total * warmup_proportion)`` (or ``warmup_steps``) and
    ``total_num_steps`` = the run's optimizer steps. For update ``s`` that is::

        s < W:   s / W
        s >= W:  max(0, (T - s) / max(1, T - W))

    -- the same curve as ``linear``. ``warmup_type = "log"`` gives DeepSpeed's other
    warm-up, ``log(s + 1) / log(max(2, W))``. (DeepSpeed also stretches a linear
    warm-up of 1 step to 2; panda does not.)
    """

    Options = WarmupOptions

    def factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        if self.options.warmup_type == "log" and step < warmup_steps:
            return math.log(step + 1) / math.log(max(2, warmup_steps))
        return super().factor(step, total_steps, warmup_steps)
