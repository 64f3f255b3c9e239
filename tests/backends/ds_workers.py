"""What the ranks of the DeepSpeed tests run (spawned by torch.multiprocessing).

Each worker runs several cases in one process group, because starting
processes that import torch, transformers and DeepSpeed dominates the cost on
2 CPU cores; a case is one backend configuration. Rank 0 writes what the test
compares to ``tmp/<case>.pt`` or ``.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from panda import registry
from standins import (StandinConstant, StandinLm, StandinSgd, collate, exit_rank,
                      register_standins, standin_build_data, standin_recipe_data, tiny_llama)


# Backend sections of the deepspeed cases, by name.
ZERO_CASES = {
    "zero0": {"name": "deepspeed", "zero_stage": 0},
    "zero1": {"name": "deepspeed", "zero_stage": 1},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "zero3-offload": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                      "offload_params": "cpu", "pin_memory": False},
}


# The deepspeed cases that train through the whole loop.
LOOP_CASES = ("zero1", "zero2", "zero3", "zero3-offload")
# The ds-pipeline backend section of the pipeline cases: 2 stages, ZeRO-1 (fp32 needs it).
PIPELINE = {"num_stages": 2, "zero_stage": 1}


def save_hf_folder(model: Any, folder: Path) -> str:
    """``model`` and the repository's tiny tokenizer as a Hugging Face folder."""
    from panda.models import tiny_tokenizer

    model.save_pretrained(folder)
    tiny_tokenizer.load().save_pretrained(folder)
    return str(folder)


def join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)


def backend_job(tmp: str, backend: dict[str, Any], *, batch_size: int, accumulation: int,
                max_grad_norm: float, lr: float = 0.05, precision: str = "fp32"):
    """A Job around the tiny Llama with ``backend`` (name + options) set up; no data."""
    from panda import recipe as recipe_io
    from panda.job import Job

    register_standins()
    data = standin_recipe_data(tmp, per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, precision=precision)
    data["optim"].update(lr=lr, max_grad_norm=max_grad_norm)
    data["backend"] = dict(backend)
    recipe = recipe_io.validate(data)
    plugin = registry.get("backend", backend["name"])(recipe.backend.options)
    dist = plugin.init_distributed()
    job = Job(recipe=recipe, backend=plugin, dist=dist, output_dir=Path(tmp), model=tiny_llama(0),
              method=StandinLm(), optimizer_plugin=StandinSgd(),
              schedule_plugin=StandinConstant(), total_steps=10)
    plugin.setup(job)
    return job


def full_weights(backend: Any) -> dict[str, torch.Tensor] | None:
    """The engine's full weights on rank 0 (gathered under ZeRO-3), None on other ranks."""
    from panda.backends.zero_export import gathered_state_dict

    module = backend.engine.module
    if backend.zero_stage == 3:
        return gathered_state_dict(module)
    if backend.dist.rank != 0:
        return None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_step_worker(rank: int, world_size: int, port: int, tmp: str, cases: list[dict],
                    micro_batches: list) -> None:
    """Per case: one optimizer step on this rank's micro-batches; rank 0 saves loss + weights."""
    join(rank, world_size, port)
    for case in cases:
        job = backend_job(tmp, case["backend"], batch_size=1, accumulation=len(micro_batches[rank]),
                          max_grad_norm=case["clip"])
        result = job.backend.train_step([collate(mb) for mb in micro_batches[rank]])
        weights = full_weights(job.backend)
        if rank == 0:
            torch.save({"result": result, "state": weights}, Path(tmp) / f"{case['name']}.pt")
    job.backend.close()
    exit_rank()


def train_worker(rank: int, world_size: int, ports: list[int], runs: list[dict]) -> None:
    """Per run: ``panda.job.train`` end to end with the stand-ins; rank 0 writes its summary."""
    import panda.job
    from panda import recipe as recipe_io

    register_standins()
    panda.job.build_data = standin_build_data(64)
    for port, run in zip(ports, runs):
        join(rank, world_size, port)
        data = standin_recipe_data(run["output_dir"], **run["train"])
        data["backend"] = dict(run["backend"])
        summary = panda.job.train(recipe_io.validate(data), resume=run.get("resume", "auto"))
        if rank == 0:
            Path(run["summary"]).write_text(json.dumps(summary))
    exit_rank()


# -- pipeline --------------------------------------------------------------------------------

def pipeline_job(tmp: str, model: dict[str, Any], backend: dict[str, Any], *, batch_size: int,
                 accumulation: int, max_grad_norm: float, lr: float = 0.05):
    """A Job whose model the ds-pipeline backend builds (this stage's layers only); no data."""
    from panda import recipe as recipe_io
    from panda.job import Job

    register_standins()
    data = standin_recipe_data(tmp, per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, precision="fp32")
    data["optim"].update(lr=lr, max_grad_norm=max_grad_norm)
    data["model"] = {"name": "hf", "dtype": "float32", "attn": "eager", **model}
    data["method"] = {"name": "pretrain"}
    data["backend"] = {"name": "ds-pipeline", **backend}
    recipe = recipe_io.validate(data)
    plugin = registry.get("backend", "ds-pipeline")(recipe.backend.options)
    dist = plugin.init_distributed()
    model_plugin = registry.get("model", "hf")(recipe.model.options)
    job = Job(recipe=recipe, backend=plugin, dist=dist, output_dir=Path(tmp),
              tokenizer=model_plugin.tokenizer(recipe),
              model=plugin.build_model(model_plugin, recipe),
              method=registry.get("method", "pretrain")(recipe.method.options),
              optimizer_plugin=StandinSgd(), schedule_plugin=StandinConstant(), total_steps=10)
    plugin.setup(job)
    return job


def pipeline_worker(rank: int, world_size: int, port: int, tmp: str, step_case: dict,
                    eval_cases: list[dict]) -> None:
    """A 2-stage pipeline: one training step exported to tmp/<name>, then eval sums per case."""
    join(rank, world_size, port)
    job = pipeline_job(tmp, step_case["model"], step_case["backend"], batch_size=1,
                       accumulation=len(step_case["micro_batches"]),
                       max_grad_norm=step_case["clip"])
    result = job.backend.train_step([collate(mb) for mb in step_case["micro_batches"]])
    job.backend.export(str(Path(tmp) / step_case["name"]), job.tokenizer)
    if rank == 0:
        torch.save({"result": result}, Path(tmp) / f"{step_case['name']}.pt")
    for case in eval_cases:
        job = pipeline_job(tmp, case["model"], case["backend"], batch_size=1, accumulation=1,
                           max_grad_norm=0.0)
        summed, count = job.backend.all_reduce_sum(list(job.backend.eval_step(case["batch"])))
        if rank == 0:
            torch.save({"sum": summed, "count": count}, Path(tmp) / f"{case['name']}.pt")
    job.backend.close()
    exit_rank()


def sharded_build_data(count: int):
    """standin_build_data, sharded the way the job shards real data (per replica under PP)."""
    from panda.job import data_shard
    from standins import ListBatches, random_sequences

    def build(job) -> None:
        shard, shards = data_shard(job)
        job.train_batches = ListBatches(random_sequences(count, seed=1),
                                        job.recipe.train.per_device_batch_size, shard, shards,
                                        seed=job.recipe.run.seed)

    return build


def pipeline_train_worker(rank: int, world_size: int, ports: list[int], runs: list[dict]) -> None:
    """``train_worker`` for ds-pipeline runs: the hf model plugin, the pretrain method."""
    import panda.job
    from panda import recipe as recipe_io

    register_standins()
    panda.job.build_data = sharded_build_data(64)
    for port, run in zip(ports, runs):
        join(rank, world_size, port)
        data = standin_recipe_data(run["output_dir"], **run["train"])
        data["model"] = {"name": "hf", "dtype": "float32", "attn": "eager", **run["model"]}
        data["method"] = {"name": "pretrain"}
        data["backend"] = {"name": "ds-pipeline", **run["backend"]}
        summary = panda.job.train(recipe_io.validate(data), resume=run.get("resume", "auto"))
        if rank == 0:
            Path(run["summary"]).write_text(json.dumps(summary))
    exit_rank()


# -- ZeRO-3 building the model partitioned (zero_init) -----------------------------------------

def zero_init_worker(rank: int, world_size: int, port: int, tmp: str, folder: str) -> None:
    """Build the hf model from ``folder`` through the deepspeed backend (ZeRO-3, zero_init) and
    write what each rank holds to tmp/zero-init-<rank>.json."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from panda import recipe as recipe_io

    join(rank, world_size, port)
    register_standins()
    data = standin_recipe_data(tmp, precision="fp32")
    data["model"] = {"name": "hf", "path": folder, "dtype": "float32", "attn": "eager"}
    data["backend"] = {"name": "deepspeed", "zero_stage": 3}  # zero_init "auto": a checkpoint
    recipe = recipe_io.validate(data)
    plugin = registry.get("backend", "deepspeed")(recipe.backend.options)
    plugin.init_distributed()
    model = plugin.build_model(registry.get("model", "hf")(recipe.model.options), recipe)
    params = list(model.parameters())
    held = {"partitioned": all(hasattr(p, "ds_id") for p in params),
            "local": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
            "full": sum(int(getattr(p, "ds_numel", p.numel())) for p in params)}
    plugin.close()
    held["zero3_after_close"] = is_deepspeed_zero3_enabled()
    Path(tmp, f"zero-init-{rank}.json").write_text(json.dumps(held))
    exit_rank()
