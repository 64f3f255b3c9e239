"""Tensor-parallel inference runs: one process per GPU, started by torchrun.

``panda infer --backend torch-tp --nproc 4`` re-runs the same command under
``python -m torch.distributed.run`` (never a home-made launcher). Every rank
loads its shard and runs the same decode loop; rank 0 reads input (chat) and
writes output; tokens are broadcast from rank 0 so sampling can never diverge.
A backend used without torchrun joins a one-process group of its own, so the
same code runs at degree 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def inside_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def relaunch_under_torchrun(nproc: int, args: list[str]) -> int:
    """Run ``panda ARGS`` in ``nproc`` processes on this host; return torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "panda", *args]
    return subprocess.call(command)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_process_group(device_type: str) -> tuple[int, int, int]:
    """(rank, world size, local rank), joining torch.distributed if not joined yet.

    Outside torchrun this makes a group of one, so tensor-parallel code paths
    (DeviceMesh, DTensor, DeepSpeed's AutoTP) run unchanged at degree 1.
    """
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if inside_torchrun():
            dist.init_process_group(backend)
        else:  # a group of one, without touching os.environ (child processes must not inherit it)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), local_rank


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_tokens(tokens: "torch.Tensor") -> "torch.Tensor":
    """Every rank takes rank 0's tokens (a no-op on one process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens


def share_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (chat input read by rank 0 alone)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_process_group() -> None:
    """Destroy the group once nothing uses it; the caller drops its model first.

    Sharded modules keep their DeviceMesh alive; if one outlives the group, gloo
    can abort at interpreter exit ("terminate called without an active exception"),
    so collect them before destroying.
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
