"""Learning-rate schedules."""

from __future__ import annotations

from panda.plugins.api import SchedulerPlugin


class Warmup(SchedulerPlugin):
    """PandaLLM's default: linear warm-up to the peak rate, then linear decay to 0."""
