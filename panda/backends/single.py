"""``single``: one process on the CPU or one GPU."""

from __future__ import annotations

from panda.plugins.api import TrainBackend


class Single(TrainBackend):
    """One process, one device (CPU, or the first GPU)."""
