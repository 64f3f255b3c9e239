"""Schedules that warm up linearly, then follow a shape: ``linear``, ``cosine``, ``constant``, ``poly``."""

from __future__ import annotations

import math

from pydantic import Field

from panda.plugins.api import Options, SchedulerPlugin
from panda.plugins.schedulers import decay_progress, linear_warmup


class WarmupThenDecay(SchedulerPlugin):
    """Linear warm-up from 0, then ``decay(progress)`` with progress going 0 -> 1."""

    def factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        warming = linear_warmup(step, warmup_steps)
        if warming is not None:
            return warming
        return self.decay(decay_progress(step, total_steps, warmup_steps))

    def decay(self, progress: float) -> float:
        raise NotImplementedError


class Linear(WarmupThenDecay):
    """Linear warm-up, then linear decay to 0 at the last step (Hugging Face's "linear")."""

    def decay(self, progress: float) -> float:
        return 1.0 - progress


class CosineOptions(Options):
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the "
                                "peak lr.")


class Cosine(WarmupThenDecay):
    """Linear warm-up, then half a cosine from the peak down to min_lr_ratio * peak."""

    Options = CosineOptions

    def decay(self, progress: float) -> float:
        floor = self.options.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Constant(WarmupThenDecay):
    """Linear warm-up, then the peak lr until the end."""

    def decay(self, progress: float) -> float:
        return 1.0


class PolyOptions(Options):
    power: float = Field(1.0, gt=0, description="Exponent of the decay (1 = linear; NVIDIA's "
                         "BERT recipes use 0.5).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the "
                                "peak lr.")


class Poly(WarmupThenDecay):
    """Linear warm-up, then polynomial decay (1 - progress)^power down to min_lr_ratio * peak."""

    Options = PolyOptions

    def decay(self, progress: float) -> float:
        floor = self.options.min_lr_ratio
        return floor + (1.0 - floor) * (1.0 - progress) ** self.options.power
