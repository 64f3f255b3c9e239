"""Resumable checkpoints: written whole or not at all.

Layout of ``<output_dir>/checkpoints/step-00000015/``::

    model.safetensors, engine_state.pt   the backend's (optimizer, schedule, scaler...)
    rank-00000.pt ...                    per rank: data sampler position and RNG states
    trainer_state.json                   step, tokens seen, counters (written last)
    recipe.toml                          the resolved recipe that produced it

A save goes to a hidden temporary folder, every file is fsynced, then the
folder is renamed into place and the parent directory fsynced. A crash at any
moment leaves either the old set of checkpoints or the new one, never a half
written folder under a ``step-N`` name, so ``--resume auto`` (the newest
``step-N`` folder) always finds a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from panda.errors import PandaError

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
RECIPE_FILE = "recipe.toml"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))


# -- RNG states -------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Every generator a training step may draw from, in a ``weights_only``-loadable form."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- durable writes -----------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the directories that name them."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# -- the checkpointer ---------------------------------------------------------------------------

class Checkpointer:
    """Saves and loads full training state through the backend; keeps the newest ``keep_last``."""

    def __init__(self, output_dir: str | Path, backend: Any, dist: Any, keep_last: int,
                 recipe_toml: str):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.backend = backend
        self.dist = dist
        self.keep_last = keep_last
        self.recipe_toml = recipe_toml

    def save(self, step: int, trainer_state: dict[str, Any], data_state: Any) -> Path:
        """Write checkpoint ``step`` (every rank calls this); returns its final path."""
        import torch

        final = self.root / checkpoint_name(step)
        temp = self.root / f".{final.name}.tmp"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if temp.exists():  # left by a save that was killed
                shutil.rmtree(temp)
            temp.mkdir()
        self.backend.barrier()
        self.backend.save(str(temp))
        own = temp / rank_file(self.dist.rank)
        torch.save({"data": data_state, "rng": capture_rng()}, own)
        fsync_path(own)
        self.backend.barrier()
        if self.dist.is_main:
            write_text_durably(temp / RECIPE_FILE, self.recipe_toml)
            state = {**trainer_state, "step": step, "world_size": self.dist.world_size}
            write_text_durably(temp / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
            fsync_tree(temp)
            self._replace(temp, final)
            self._prune()
        self.backend.barrier()
        return final

    def _replace(self, temp: Path, final: Path) -> None:
        if final.exists():  # the same step saved by an earlier run we resumed before it
            stale = final.with_name(f".{final.name}.old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temp, final)
            shutil.rmtree(stale)
        else:
            os.replace(temp, final)
        fsync_path(self.root)

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root.parent)[:-self.keep_last]:
            shutil.rmtree(old)

    def remove_leftovers(self) -> None:
        """Delete temporary folders of saves that were killed (rank 0, before training)."""
        if self.dist.is_main and self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.startswith(".step-") and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)

    def load(self, checkpoint: str | Path) -> tuple[dict[str, Any], Any]:
        """Restore engine state and this rank's RNG; return (trainer state, data state)."""
        import torch

        folder = Path(checkpoint)
        state = read_trainer_state(folder)
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise PandaError(f"checkpoint {folder} was saved by {saved_world} processes; this "
                             f"run has {self.dist.world_size}",
                             hint=f"resume with --nproc {saved_world}, or start over with "
                             "--resume never --overwrite")
        self.backend.load(str(folder))
        blob = torch.load(folder / rank_file(self.dist.rank), weights_only=True)
        restore_rng(blob["rng"])
        return state, blob["data"]
