"""Recipe -> resolved Job -> trained model, in one visible order.

``build_job`` makes every part a run needs, in this order (each step may use
the ones before it, none uses a later one):

1. backend and process group (``init_distributed``: rank, world size, device);
2. output folder and resume point (refuse to clobber a finished run);
3. seeds;
4. tokenizer, model, method (``method.prepare`` may add heads or references);
5. data: prepared once (rank 0 fills the cache, other ranks wait on files),
   then this rank's batches;
6. step count and warm-up, then the optimizer and schedule factories;
7. ``backend.setup(job)``: precision, device, compile, wrapping, optimizer;
8. ``method.before_training(job)``: a pass over the data some methods need
   (dpo's ``precompute_ref``).

``run_job`` then resumes if asked, trains, and exports ``<output_dir>/final``.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panda import registry
from panda.errors import PandaError, UsageError
from panda.recipe_schema import Recipe
from panda.train import checkpoint as ckpt

FINAL_DIR = "final"
RUN_RECIPE = "recipe.toml"
# What a run writes into output_dir; --overwrite removes exactly these.
RUN_OUTPUTS = (ckpt.CHECKPOINTS_DIR, FINAL_DIR, RUN_RECIPE, "metrics.jsonl", "tensorboard",
               "wandb_id")


@dataclass
class Job:
    """Everything a training run is made of, resolved from the recipe."""

    recipe: Recipe
    backend: Any
    dist: Any
    output_dir: Path
    resume_from: Path | None = None
    resume_command: str = "panda train RECIPE --resume auto"
    tokenizer: Any = None
    model: Any = None
    method: Any = None
    train_batches: Any = None
    eval_batches: Any = None
    total_steps: int = 0
    warmup_steps: int = 0
    optimizer_plugin: Any = None
    schedule_plugin: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def build_optimizer(self, model: Any) -> Any:
        from panda.plugins.optimizers import param_groups

        groups = param_groups(model, self.recipe.optim.weight_decay)
        return self.optimizer_plugin.build(groups, self.recipe.optim.lr)

    def schedule_factor(self, step: int) -> float:
        return self.schedule_plugin.factor(step, self.total_steps, self.warmup_steps)

    def build_scheduler(self, optimizer: Any) -> Any:
        from panda.plugins.schedulers import make_lr_scheduler

        return make_lr_scheduler(optimizer, self.schedule_plugin, self.total_steps,
                                 self.warmup_steps)


# -- public entry point ---------------------------------------------------------------------

def train(recipe_or_path: Any, overrides: list[str] | None = None, resume: str = "auto",
          overwrite: bool = False, command: str | None = None) -> dict[str, Any]:
    """Train from a recipe path (with ``--set`` style overrides) or a Recipe.

    ``resume``: "auto" continues from the newest complete checkpoint in
    ``run.output_dir`` if there is one, "never" starts over, or a checkpoint
    path. A non-empty output folder without a checkpoint is refused unless
    ``overwrite``. Returns a summary (step, losses, paths, interrupted).
    """
    recipe, recipe_path = load_recipe(recipe_or_path, overrides or [])
    if command is None:
        command = resume_command(recipe_path, overrides or [])
    job = build_job(recipe, resume=resume, overwrite=overwrite, command=command)
    return run_job(job)


def load_recipe(recipe_or_path: Any, overrides: list[str]) -> tuple[Recipe, str | None]:
    from panda import recipe as recipe_io

    if isinstance(recipe_or_path, Recipe):
        if overrides:
            data = recipe_or_path.dump()
            origins: dict = {}
            for text in overrides:
                recipe_io.apply_override(data, origins, text)
            return recipe_io.validate(data, origins), None
        return recipe_or_path, None
    return recipe_io.load(recipe_or_path, overrides), str(recipe_or_path)


def resume_command(recipe_path: str | None, overrides: list[str], nproc: int | None = None
                   ) -> str:
    import shlex

    if recipe_path is None:
        return "panda.train(recipe, resume='auto')"
    parts = ["panda", "train", recipe_path]
    for text in overrides:
        parts += ["--set", text]
    if nproc and nproc > 1:
        parts += ["--nproc", str(nproc)]
    return shlex.join([*parts, "--resume", "auto"])


# -- building -------------------------------------------------------------------------------

def build_job(recipe: Recipe, *, resume: str = "auto", overwrite: bool = False,
              command: str = "panda train RECIPE --resume auto") -> Job:
    # 1. backend first: it knows this process's rank and device
    backend = make_backend(recipe)
    dist = backend.init_distributed()
    # 2. where the run writes, and whether it continues an earlier one
    output_dir = Path(recipe.run.output_dir)
    resume_from = resolve_resume(output_dir, resume, overwrite)
    if dist.is_main:
        prepare_output_dir(output_dir, clean=overwrite and resume_from is None)
    backend.barrier()
    job = Job(recipe=recipe, backend=backend, dist=dist, output_dir=output_dir,
              resume_from=resume_from, resume_command=command)
    # 3. seeds: the same on every rank so replicas start equal (DDP also broadcasts)
    seed_everything(recipe.run.seed)
    # 4. tokenizer, model, method
    model_plugin = registry.get("model", recipe.model.name)(recipe.model.options)
    job.tokenizer = model_plugin.tokenizer(recipe)
    # A backend that spreads the layers over ranks (pipeline) builds only its own part.
    build_model = getattr(backend, "build_model", None)
    job.model = build_model(model_plugin, recipe) if build_model else model_plugin.build(recipe)
    if recipe.lora is not None:  # after gradient checkpointing, before anything wraps it
        from panda.adapters import apply_lora

        job.model = apply_lora(job.model, recipe.lora, recipe.quant)
    job.method = registry.get("method", recipe.method.name)(recipe.method.options)
    job.model = job.method.prepare(job.model, job)
    # 5. data
    build_data(job)
    # 6. steps, optimizer and schedule
    job.total_steps = total_steps(recipe, job.train_batches.batches_per_epoch)
    job.warmup_steps = warmup_steps(recipe.schedule, job.total_steps)
    job.optimizer_plugin = registry.get("optimizer", recipe.optim.name)(recipe.optim.options)
    job.schedule_plugin = registry.get("scheduler", recipe.schedule.name)(recipe.schedule.options)
    # 7. the backend wraps the model and builds optimizer + schedule
    backend.setup(job)
    # 8. a method that needs one pass over the data first (dpo's precompute_ref), run by
    #    the backend like evaluation, so every rank and sharding scheme takes part
    before_training = getattr(job.method, "before_training", None)
    if before_training is not None:
        before_training(job)
    return job


def make_backend(recipe: Recipe) -> Any:
    """The recipe's backend; ``auto`` = single on one process, ddp when WORLD_SIZE > 1."""
    from panda.backends.base import env_world_size

    name = recipe.backend.name
    if name == "auto":
        name = "ddp" if env_world_size() > 1 else "single"
        plugin = registry.get("backend", name)
        return plugin(plugin.Options())
    return registry.get("backend", name)(recipe.backend.options)


def build_data(job: Job) -> None:
    import panda.data as data

    recipe = job.recipe
    data_format = getattr(job.method, "data_format", "lm")
    prepared = data.prepare(recipe, job.tokenizer, split="train", data_format=data_format)
    shard, shards = data_shard(job)
    job.train_batches = data.TrainBatches(prepared, batch_size=recipe.train.per_device_batch_size,
                                          rank=shard, world_size=shards, seed=recipe.run.seed)
    if recipe.data.eval_sources or recipe.data.eval_fraction > 0:
        held_out = data.prepare(recipe, job.tokenizer, split="eval", data_format=data_format)
        job.eval_batches = data.EvalBatches(held_out,
                                            batch_size=recipe.train.per_device_batch_size,
                                            rank=shard, world_size=shards)


def data_shard(job: Job) -> tuple[int, int]:
    """(this rank's shard, shard count) of the data: one shard per rank, unless the backend
    groups ranks into data-parallel replicas that each hold one model (pipeline stages)."""
    shard = getattr(job.backend, "data_shard", None)
    return shard() if shard else (job.dist.rank, job.dist.world_size)


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    """max_steps, or enough steps for num_epochs passes (the last step may start the next)."""
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    if batches_per_epoch <= 0:
        raise PandaError("the training data is empty after tokenization",
                         hint="check data.sources and data.max_seq_length")
    micro_batches = recipe.train.num_epochs * batches_per_epoch
    return max(1, math.ceil(micro_batches / recipe.train.gradient_accumulation_steps))


def warmup_steps(schedule: Any, total: int) -> int:
    from panda.plugins.schedulers import resolve_warmup_steps

    return min(total, resolve_warmup_steps(schedule, total))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


# -- the output folder ----------------------------------------------------------------------

def resolve_resume(output_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start (which may need overwrite)."""
    if resume not in ("auto", "never"):
        path = Path(resume)
        if overwrite:
            raise UsageError("--overwrite starts over; it cannot be combined with --resume PATH")
        if not (path / ckpt.TRAINER_STATE).is_file():
            raise UsageError(f"{path} is not a complete panda checkpoint (no "
                             f"{ckpt.TRAINER_STATE})",
                             hint=f"pick a step-N folder under {output_dir / 'checkpoints'}, "
                             "or use --resume auto")
        return path
    if resume == "auto" and not overwrite:
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is not None:
            return latest
    if not overwrite and _has_run_outputs(output_dir):
        raise UsageError(f"output_dir {output_dir} is not empty and holds no checkpoint to "
                         "resume" if resume == "auto" else
                         f"output_dir {output_dir} is not empty (--resume never)",
                         hint="add --overwrite to replace it, or write elsewhere with "
                         "--set run.output_dir=...")
    return None


def _has_run_outputs(output_dir: Path) -> bool:
    return output_dir.is_dir() and any(output_dir.iterdir())


def prepare_output_dir(output_dir: Path, clean: bool) -> None:
    if clean:
        for name in RUN_OUTPUTS:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


# -- running --------------------------------------------------------------------------------

def run_job(job: Job) -> dict[str, Any]:
    from panda.recipe import to_toml
    from panda.train.checkpoint import Checkpointer
    from panda.train.loop import Trainer
    from panda.train.metrics import (MetricsLogger, Throughput, device_name, flops_per_token,
                                     peak_tflops)

    recipe, dist, backend = job.recipe, job.dist, job.backend
    recipe_toml = to_toml(recipe)
    checkpointer = Checkpointer(job.output_dir, backend, dist, recipe.train.keep_last,
                                recipe_toml)
    resume_step = ckpt.read_trainer_state(job.resume_from)["step"] if job.resume_from else 0
    if dist.is_main:
        checkpointer.remove_leftovers()
        (job.output_dir / RUN_RECIPE).write_text(recipe_toml, encoding="utf-8")
    metrics = MetricsLogger(job.output_dir, recipe.log, is_main=dist.is_main,
                            total_steps=job.total_steps, resume_step=resume_step,
                            run_name=recipe.run.name, config=recipe.dump())
    peak = peak_tflops(device_name(dist.device), recipe.train.precision,
                       recipe.train.peak_tflops)
    model = job.model
    throughput = Throughput(lambda seq: flops_per_token(model, seq), peak, dist.world_size)
    trainer = Trainer(job, backend, checkpointer, metrics, throughput)
    try:
        if job.resume_from is not None:
            trainer.resume(job.resume_from)
            metrics.message(f"resumed from {job.resume_from} at step {trainer.state.step}")
        fit = trainer.fit()
        summary = {"step": fit.state.step, "tokens_seen": fit.state.tokens_seen,
                   "loss": fit.state.last_loss, "eval": fit.state.last_eval,
                   "nonfinite_steps": fit.state.nonfinite_steps,
                   "interrupted": fit.interrupted, "output_dir": str(job.output_dir),
                   "checkpoint": str(fit.checkpoint) if fit.checkpoint else None,
                   "history": fit.history, "final": None}
        if fit.interrupted:
            metrics.message(f"stopped at step {fit.state.step}; checkpoint {fit.checkpoint}")
            metrics.message(f"resume with: {job.resume_command}")
            return summary
        final = job.output_dir / FINAL_DIR
        backend.export(str(final), job.tokenizer)
        summary["final"] = str(final)
        metrics.message(f"done: {fit.state.step} steps; model saved to {final}")
        return summary
    finally:
        metrics.close()
        backend.close()

