"""``ddp``: torch DistributedDataParallel, one full replica per process.

NCCL on GPUs, gloo on CPU. Start it with ``panda train --nproc N`` (which
re-executes under torch.distributed.run) or under torchrun / srun directly.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

from pydantic import Field

from panda.backends.base import DistInfo, TorchBackend, default_device, env_world_size
from panda.plugins.api import Options


class DdpOptions(Options):
    find_unused_parameters: bool = Field(False, description="Let DDP tolerate parameters "
                                         "that get no gradient in a step (slower).")
    bucket_cap_mb: float = Field(25.0, gt=0, description="Size of the gradient buckets "
                                 "all-reduced together, in MiB.")
    static_graph: bool = Field(False, description="Tell DDP the graph never changes "
                               "(enables optimisations with activation checkpointing).")


class Ddp(TorchBackend):
    """DistributedDataParallel over torch.distributed (NCCL on GPU, gloo on CPU)."""

    Options = DdpOptions
    # DDP divides the summed gradients by the world size; train_step undoes that.
    averages_gradients_over_ranks = True
    optimizer_is_plain = True

    def init_distributed(self) -> DistInfo:
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = default_device(local_rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ and env_world_size() == 1:
                # one process without a launcher: a world of one is still a valid run
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        self.dist = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                             local_rank=local_rank, device=device)
        return self.dist

    def wrap(self, model: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = self.device.type == "cuda"
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if on_gpu else None,
            find_unused_parameters=self.options.find_unused_parameters,
            bucket_cap_mb=self.options.bucket_cap_mb, static_graph=self.options.static_graph,
            gradient_as_bucket_view=True)

    def gradient_sync(self, last_micro_batch: bool) -> Any:
        # Accumulating micro-batches skip the all-reduce; the last one syncs the sum.
        return nullcontext() if last_micro_batch else self.model.no_sync()

    def all_reduce_sum_(self, tensor: Any) -> Any:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.dist.device.startswith("cuda"):
            dist.barrier(device_ids=[self.dist.local_rank])
        else:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # A rank that tears down gloo while a peer is still in a collective aborts
            # the peer; meet first.
            dist.barrier()
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
