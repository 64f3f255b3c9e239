"""Worker for test_nvlamb_on_sharded_dtensors: NVLAMB on FSDP2-style sharded DTensors vs plain."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from panda.plugins.optimizers.nvlamb_optimizer import NVLAMBOptimizer

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    weights = [torch.randn(4, 3), torch.randn(6)]
    steps = [[torch.randn(4, 3), torch.randn(6)] for _ in range(2)]
    plain = [torch.nn.Parameter(w.clone()) for w in weights]
    sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
               for w in weights]

    def optimizer(params):
        return NVLAMBOptimizer([{"params": params[:1], "weight_decay": 0.1},
                                {"params": params[1:], "weight_decay": 0.0}], lr=0.05)

    plain_optimizer, sharded_optimizer = optimizer(plain), optimizer(sharded)
    for grads in steps:
        for p, q, g in zip(plain, sharded, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        plain_optimizer.step()
        sharded_optimizer.step()
    worst = max(float((p.detach() - q.detach().full_tensor()).abs().max())
                for p, q in zip(plain, sharded))
    if rank == 0:
        with open(result_file, "w") as out:
            out.write(repr(worst))
    dist.barrier()  # both ranks done before teardown: gloo aborts when a peer leaves mid-exchange
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    port, result_file = int(sys.argv[1]), sys.argv[2]
    mp.spawn(run, args=(2, port, result_file), nprocs=2)
