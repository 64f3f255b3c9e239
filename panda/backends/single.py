"""``single``: one process on the CPU or one GPU."""

from __future__ import annotations

from panda.backends.base import TorchBackend


class Single(TorchBackend):
    """One process, one device (CPU, or the first GPU)."""

    optimizer_is_plain = True
