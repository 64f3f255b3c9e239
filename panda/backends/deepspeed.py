"""``deepspeed``: DeepSpeed ZeRO stage 0-3, with optimizer and parameter offload.

DeepSpeed owns backward and the optimizer step (``engine.backward`` /
``engine.step``), so this backend implements the ``TrainBackend`` contract
directly instead of sharing ``TorchBackend``. The recipe decides everything
that changes the math (micro-batch, accumulation, clipping, precision): panda
writes the DeepSpeed config from it (``panda.backends.deepspeed_config``).

``setup`` does, in this order:

1. precision: fp32 casts the model to fp32; bf16/fp16 leave the cast to
   DeepSpeed, which keeps fp32 master weights inside its optimizer;
2. device placement for ZeRO 0-2 without offload (ZeRO-3 partitions from the
   host copy instead of first putting a whole replica on every GPU);
3. the optimizer: panda's ``[optim]`` plugin, except ``adamw`` with
   ``offload_optimizer``, which becomes DeepSpeedCPUAdam (the same AdamW
   update in vectorised C++; torch's AdamW on the CPU copy is several times
   slower). ``cpu_adam = false`` keeps the plugin's optimizer;
4. the schedule from ``[schedule]`` on that optimizer;
5. ``deepspeed.initialize``, which wraps the model and partitions state.

Loss normalisation (DESIGN section 6): each micro-batch backpropagates its
loss sum times ``dp / units``, where ``units`` is the step's target-token
count over every micro-batch and rank (all-reduced before the first forward)
and ``dp`` undoes DeepSpeed's average of gradients over data-parallel ranks;
``engine.backward(..., scale_wrt_gas=False)`` turns off its own division by
the accumulation steps. The gradients are then those of the step's token mean.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import Field, model_validator

from panda.backends.base import (DistInfo, default_device, env_world_size,
                                 needs_full_reference_copy, refuse_full_reference_copy)
from panda.errors import PandaError, require
from panda.plugins.api import Options, TrainBackend
from panda.recipe_schema import InvalidKey

log = logging.getLogger(__name__)

ENGINE_DIR = "deepspeed"  # engine.save_checkpoint's folder inside a panda checkpoint
ENGINE_TAG = "state"      # its tag: <checkpoint>/deepspeed/state/...
HF_META_DIR = "hf-meta"   # config + tokenizer, so any checkpoint converts to an HF folder

Offload = Literal["none", "cpu", "nvme"]


class DeepSpeedOptions(Options):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 = plain data "
                                            "parallel, 1 = shard optimizer state, 2 = also "
                                            "gradients, 3 = also parameters.")
    offload_optimizer: Offload = Field("none", description="Keep optimizer state (and its "
                                       "step) on the CPU or NVMe; needs zero_stage >= 1 "
                                       "(NVMe: zero_stage 3).")
    offload_params: Offload = Field("none", description="Keep parameters on the CPU or NVMe "
                                    "between uses; needs zero_stage 3.")
    nvme_path: Optional[str] = Field(None, description="Folder on a fast local NVMe drive, "
                                     "for offload to nvme.")
    pin_memory: bool = Field(True, description="Pin offloaded CPU memory (faster copies, "
                             "locked RAM).")
    cpu_adam: bool = Field(True, description="With offload_optimizer and optim.name = "
                           "'adamw', step with DeepSpeedCPUAdam (same AdamW, vectorised "
                           "C++, JIT-built on first use); false keeps torch's AdamW.")
    zero_init: Union[Literal["auto"], bool] = Field(
        "auto", description="ZeRO-3: build the model already partitioned over the ranks "
        "(deepspeed.zero.Init, through transformers), so each rank's memory holds its share "
        "of the weights, not the whole model. 'auto': for a checkpoint (model.path), unless "
        "the method keeps a frozen full copy of the weights (dpo without [lora] or "
        "precompute_ref); a preset is then built whole, so its random weights equal those of "
        "every other backend for the same run.seed. true: always (a preset gets another "
        "random draw); false: every rank builds the whole model first.")
    config_file: Optional[str] = Field(None, description="Advanced: a DeepSpeed JSON config "
                                       "whose extra keys are merged in; keys the recipe "
                                       "decides must agree with it.")

    @model_validator(mode="after")
    def _offload_fits_stage(self) -> "DeepSpeedOptions":
        if self.offload_params != "none" and self.zero_stage != 3:
            raise InvalidKey("offload_params", "parameter offload needs zero_stage = 3 "
                             f"(got {self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise InvalidKey("offload_optimizer", "optimizer offload needs zero_stage >= 1")
        if self.offload_optimizer == "nvme" and self.zero_stage != 3:
            raise InvalidKey("offload_optimizer", "optimizer offload to nvme needs "
                             f"zero_stage = 3 (ZeRO-Infinity); got {self.zero_stage}")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise InvalidKey("nvme_path", "offload to nvme needs nvme_path (a folder on a "
                             "local NVMe drive)")
        return self


def import_deepspeed(what: str = "backend 'deepspeed'") -> Any:
    """Import DeepSpeed for this machine: its CPU accelerator when there is no GPU, quiet logs."""
    import torch

    if not torch.cuda.is_available():
        # Without this DeepSpeed probes for other accelerators and fails on CPU-only hosts.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = require("deepspeed", what=what, package="DeepSpeed", extra="deepspeed")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # panda reports progress; DeepSpeed's INFO lines are noise
    return deepspeed


def join_process_group(deepspeed: Any) -> DistInfo:
    """``deepspeed.init_distributed`` from torchrun/deepspeed/srun variables (or a world of one)."""
    import torch
    import torch.distributed as dist

    from panda.launch import adopt_slurm_environment

    adopt_slurm_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and env_world_size() == 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, device=device)


class DeepSpeed(TrainBackend):
    """DeepSpeed ZeRO 0-3 with CPU/NVMe offload; the DeepSpeed config comes from the recipe."""

    Options = DeepSpeedOptions

    @classmethod
    def check_recipe(cls, options: DeepSpeedOptions, recipe: Any) -> None:
        from panda.backends.deepspeed_config import check_config_file

        if recipe.quant is not None and options.zero_stage == 3:
            raise InvalidKey(("backend", "zero_stage"), "ZeRO-3 cannot partition quantized "
                             "(bitsandbytes) weights; use zero_stage 2 with [quant]")
        if recipe.train.compile:
            raise InvalidKey(("train", "compile"), "train.compile is not supported with the "
                             "deepspeed backend; set it to false")
        refuse_full_reference_copy(options, recipe, "zero_init", "which cannot be made from "
                                   "a model that ZeRO-3 built partitioned")
        check_config_file(recipe, options)

    # -- process group --------------------------------------------------------------------
    def init_distributed(self) -> DistInfo:
        self.deepspeed = import_deepspeed()
        self.dist = join_process_group(self.deepspeed)
        return self.dist

    @property
    def data_parallel_size(self) -> int:
        return self.dist.world_size

    # -- the model ------------------------------------------------------------------------
    def build_model(self, model_plugin: Any, recipe: Any) -> Any:
        """The model plugin's model; under ZeRO-3 with ``zero_init``, built partitioned.

        transformers builds a model inside ``deepspeed.zero.Init`` (and loads a checkpoint
        into its partitions) while an ``HfDeepSpeedConfig`` is alive; it holds only a weak
        reference, so the backend keeps it until ``close``. Each rank then holds its
        share of the weights: a 65B model no longer needs 130 GB of host memory per rank.
        """
        if partitions_at_build(self.options, recipe):
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_model_config = HfDeepSpeedConfig(self._config(recipe))
            log.info("ZeRO-3: the model is built partitioned over %d ranks (zero.Init)",
                     self.dist.world_size)
        return model_plugin.build(recipe)

    def _uses_cpu_adam(self, recipe: Any) -> bool:
        return (self.options.offload_optimizer != "none" and self.options.cpu_adam and
                recipe.optim.name == "adamw")

    def _config(self, recipe: Any) -> dict[str, Any]:
        from panda.backends.deepspeed_config import build_config

        return build_config(recipe, self.options, self.data_parallel_size,
                            self._uses_cpu_adam(recipe))

    # -- setup ----------------------------------------------------------------------------
    def setup(self, job: Any) -> None:
        import torch

        self.job, self.method, self.dist = job, job.method, job.dist
        self.device = torch.device(self.dist.device)
        options, precision = self.options, job.recipe.train.precision
        model = job.model
        self.export_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                 None)
        # Training never needs a KV cache, and with one transformers stops deriving the
        # per-document mask from position_ids: packed documents would see each other.
        self.config_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        if self.config_use_cache:
            model.config.use_cache = False
        # A model built partitioned (build_model) already has the dtype of DeepSpeed's config.
        partitioned = getattr(self, "_zero3_model_config", None) is not None
        if precision == "fp32" and not getattr(model, "is_quantized", False) and not partitioned:
            model.float()
        if options.zero_stage < 3 and options.offload_optimizer == "none":
            model.to(self.device)
        self.uses_cpu_adam = self._uses_cpu_adam(job.recipe)
        optimizer = self._build_optimizer(model)
        scheduler = job.build_scheduler(optimizer)
        config = self._config(job.recipe)
        self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False)
        self.precision = precision
        self.zero_stage = options.zero_stage
        # Without ZeRO or a mixed-precision wrapper DeepSpeed steps the plain optimizer and
        # neither measures the gradient norm nor skips non-finite steps; panda does both.
        self.panda_checks_gradients = options.zero_stage == 0 and precision == "fp32"

    def _build_optimizer(self, model: Any) -> Any:
        if not self.uses_cpu_adam:
            return self.job.build_optimizer(model)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from panda.plugins.optimizers import param_groups

        recipe = self.job.recipe
        adam = recipe.optim.options
        return DeepSpeedCPUAdam(param_groups(model, recipe.optim.weight_decay), lr=recipe.optim.lr,
                                betas=tuple(adam.betas), eps=adam.eps, adamw_mode=True)

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        import torch

        from panda.data.batches import token_slots

        engine = self.engine
        engine.train()
        local_units = sum(int(self.method.units(batch)) for batch in micro_batches)
        local_tokens = sum(token_slots(batch) for batch in micro_batches)
        units, tokens = self.all_reduce_sum([local_units, local_tokens])
        lr = float(self.scheduler.get_last_lr()[0])
        if units == 0:  # nothing to learn from anywhere: keep the schedule moving, no update
            self.scheduler.step()
            return {"loss": 0.0, "grad_norm": 0.0, "lr": lr, "units": 0.0, "tokens": tokens,
                    "nonfinite": 0.0}
        scale = self.data_parallel_size / units
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            # Tell DeepSpeed where the step ends, whatever its configured accumulation says.
            engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            summed, _count, metrics = self.method.loss(engine, self.to_device(batch))
            engine.backward(summed * scale, scale_wrt_gas=False)
            loss_sum += summed.detach().double()
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0.0) + float(value) / len(micro_batches)
        loss = float(self.all_reduce_sum_tensor(loss_sum)) / units
        grad_norm = self._finish_step(loss)
        nonfinite = not math.isfinite(loss)
        if self.precision != "fp16":  # an fp16 overflow is the loss scaler's business
            nonfinite = nonfinite or not engine.was_step_applied() or not math.isfinite(grad_norm)
        result = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "units": units,
                  "tokens": tokens, "nonfinite": float(nonfinite)}
        result.update(self._mean_over_ranks(extra))
        return result

    def _finish_step(self, loss: float) -> float:
        """``engine.step`` (clip, step, advance the schedule); returns the norm before clipping."""
        import torch

        measured = None
        if self.panda_checks_gradients:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            measured = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not (math.isfinite(measured) and math.isfinite(loss)):
                # The plain optimizer would apply NaNs: drop the gradients so it skips them.
                for param in self.engine.module.parameters():
                    param.grad = None
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = reported if reported is not None else measured
        return float(norm) if norm is not None else 0.0

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        non_blocking = self.device.type == "cuda"
        return {key: value.to(self.device, non_blocking=non_blocking)
                if hasattr(value, "to") and not key.startswith("_") else value
                for key, value in batch.items()}

    # -- numbers across ranks ---------------------------------------------------------------
    def all_reduce_sum_tensor(self, tensor: Any) -> Any:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        return self.all_reduce_sum_tensor(tensor).tolist()

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if not metrics:
            return {}
        keys = sorted(metrics)
        summed = self.all_reduce_sum([metrics[k] for k in keys])
        return {k: v / self.dist.world_size for k, v in zip(keys, summed)}

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    # -- evaluation -----------------------------------------------------------------------
    def eval_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        import torch

        self.engine.eval()
        with torch.no_grad():
            summed, count, _ = self.method.loss(self.engine, self.to_device(batch))
        return float(summed), int(count)

    # -- state ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """DeepSpeed's own checkpoint (each rank its partition), plus HF config and tokenizer."""
        self.engine.save_checkpoint(str(Path(path) / ENGINE_DIR), tag=ENGINE_TAG)
        if self.dist.is_main:
            with cache_restored(self):
                write_hf_meta(self.engine.module, self.job.tokenizer, Path(path) / HF_META_DIR)

    def load(self, path: str) -> None:
        folder = Path(path) / ENGINE_DIR
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=ENGINE_TAG,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise PandaError(f"{path} holds no DeepSpeed state for this run ({folder})",
                             hint="resume with the backend that wrote the checkpoint")

    def export(self, path: str, tokenizer: Any) -> None:
        from panda.backends.zero_export import export_engine

        with cache_restored(self):
            export_engine(self.engine, self.zero_stage, tokenizer, path, self.export_dtype,
                          is_main=self.dist.is_main)
        self.barrier()

    def close(self) -> None:
        """Free the engine; the process group stays up until the process exits.

        DeepSpeed caches process groups module-wide (``deepspeed.utils.groups``): after a
        ``destroy_process_group`` a second run in the same process would broadcast over a
        dead group. A later run here reuses the live group instead.
        """
        self.barrier()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.destroy()
            self.engine = None
        if getattr(self, "_zero3_model_config", None) is not None:
            # Later models in this process (an inference run, the next test) build whole.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._zero3_model_config = None


def partitions_at_build(options: Any, recipe: Any) -> bool:
    """Whether the model is built partitioned (see ``DeepSpeedOptions.zero_init``). Never
    with [quant]: bitsandbytes weights cannot be partitioned (check_recipe refuses ZeRO-3
    with it anyway)."""
    zero_init = getattr(options, "zero_init", False)
    if getattr(options, "zero_stage", 0) != 3 or recipe.quant is not None or not zero_init:
        return False
    if zero_init == "auto":
        from_checkpoint = getattr(recipe.model.options, "path", None) is not None
        return from_checkpoint and not needs_full_reference_copy(recipe)
    return True


@contextmanager
def cache_restored(backend: Any) -> Iterator[None]:
    """The model config's ``use_cache`` as the model came, while writing it out."""
    config = getattr(backend.engine.module, "config", None)
    if backend.config_use_cache:
        config.use_cache = True  # generation wants its cache back
    try:
        yield
    finally:
        if backend.config_use_cache:
            config.use_cache = False


def write_hf_meta(model: Any, tokenizer: Any, folder: Path) -> None:
    """Config, generation config and tokenizer: what an HF folder needs besides weights."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
