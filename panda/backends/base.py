"""What eager PyTorch training backends share: one optimizer step, done right.

The contract every backend implements is ``panda.plugins.api.TrainBackend``
(engines that own backward and the optimizer, like DeepSpeed, implement it
directly). ``TorchBackend`` implements it for backends where panda itself
runs forward, backward, clipping and the optimizer: ``single``, ``ddp`` and
later ``fsdp``. A subclass changes only how the model is wrapped, how
gradients are synchronised, and how numbers are summed across ranks.

``setup`` applies its transforms in this order, and the order matters:

1. precision: trainable weights to fp32 (master weights) before anything
   holds a reference to them;
2. device placement, before wrapping (DDP and FSDP wrap device-resident
   modules);
3. ``torch.compile`` of the bare module (in place, so state-dict keys stay the
   model's own and checkpoints load with or without compile);
4. the parallel wrapper (``wrap``);
5. optimizer and schedule from the bare module's parameters, after wrapping
   (FSDP replaces parameters when it shards them).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from panda.errors import PandaError
from panda.plugins.api import TrainBackend, step_values_on_host

ENGINE_STATE = "engine_state.pt"  # optimizer, schedule and loss scaler
MODEL_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, how many ranks there are, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(local_rank: int = 0) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class TorchBackend(TrainBackend):
    """Forward, backward, clipping and the optimizer step in plain PyTorch."""

    # DDP averages gradients over ranks; a backend that does so sets this to the
    # world size so the loss it backpropagates is scaled back to a plain sum.
    averages_gradients_over_ranks = False
    _in_train_mode = False  # see enter_train_mode
    # Whether the optimizer this backend steps is the one it built, so that a fused torch
    # optimizer's found_inf can skip a non-finite update (see _skips_on_device). Off where a
    # wrapper stands between them (FairScale's OSS) or the parameters are shards (FSDP).
    optimizer_is_plain = False

    # -- the lifecycle --------------------------------------------------------------------
    def init_distributed(self) -> DistInfo:
        if env_world_size() > 1:
            raise PandaError(f"backend '{type(self).__name__.lower()}' runs one process, but "
                             f"WORLD_SIZE={env_world_size()}",
                             hint="set backend.name = \"ddp\" (or \"auto\") for several processes")
        self.dist = DistInfo(device=default_device())
        return self.dist

    def setup(self, job: Any) -> None:
        import torch

        from panda.backends.precision import Precision

        self.job = job
        self.dist = job.dist
        self.method = job.method
        self.device = torch.device(self.dist.device)
        self.precision = Precision(job.recipe.train.precision, self.device.type)
        model = job.model
        self.export_dtype = _floating_dtype(model)
        # Training never needs a KV cache, and with one transformers stops deriving the
        # per-document mask from position_ids: packed documents would see each other.
        config = getattr(model, "config", None)
        self.config_use_cache = getattr(config, "use_cache", None)
        if self.config_use_cache:
            config.use_cache = False
        self.precision.prepare_model(model)
        model.to(self.device)
        if job.recipe.train.compile:
            model.compile()
        self.unwrapped = model
        self.model = self.wrap(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = job.build_optimizer(model)
        self.scheduler = job.build_scheduler(self.optimizer)
        self.scaler = self.precision.grad_scaler()
        self.max_grad_norm = job.recipe.optim.max_grad_norm

    # -- hooks for subclasses -------------------------------------------------------------
    def wrap(self, model: Any) -> Any:
        """The module forward passes go through (DDP, FSDP...); the bare one here."""
        return model

    def gradient_sync(self, last_micro_batch: bool) -> Any:
        """Context for one micro-batch's forward+backward; DDP syncs only on the last."""
        return nullcontext()

    def all_reduce_sum_(self, tensor: Any) -> Any:
        """Sum ``tensor`` over ranks in place."""
        return tensor

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch

        if self.dist.world_size == 1:  # nothing to sum, and no device round trip
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        return self.all_reduce_sum_(tensor).tolist()

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        import torch

        from panda.data.batches import token_slots

        self.enter_train_mode()
        # Units are counted before the forward pass, on the host: no device sync, and every
        # rank learns the step's total before its first backward.
        local_units = sum(int(self.method.units(batch)) for batch in micro_batches)
        local_tokens = sum(token_slots(batch) for batch in micro_batches)
        units, tokens = self.all_reduce_sum([local_units, local_tokens])
        # Each micro-batch backpropagates sum / (units of the whole step), so the gradients add
        # up to those of the step's mean loss whatever the split; a backend that averages
        # gradients over ranks gets the world size back.
        scale = (self.dist.world_size if self.averages_gradients_over_ranks else 1) / max(units, 1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, Any] = {}  # method metrics, kept on the device until the step's sync
        for index, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            with self.gradient_sync(index == len(micro_batches) - 1):
                with self.precision.autocast():
                    summed, _count, metrics = self.method.loss(self.model, batch)
                scaled = summed * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += summed.detach().double()
            for key, value in metrics.items():
                value = value.detach() if hasattr(value, "detach") else value
                extra[key] = extra.get(key, 0.0) + value
        loss = self.all_reduce_sum_(loss_sum) / max(units, 1)
        result = self.optimizer_step(loss, skip=units == 0)
        result.update(units=units, tokens=tokens)
        result.update(self._mean_over_ranks(
            {k: v / len(micro_batches) for k, v in extra.items()}))
        return result

    def optimizer_step(self, loss: Any, skip: bool = False) -> dict[str, Any]:
        """Unscale, clip, step (unless something is not finite), advance the schedule.

        ``loss`` is a float or a 0-d device tensor. Where the optimizer can skip a
        non-finite update on the device (torch's fused kernels), nothing waits here: the
        numbers come back as device tensors and the loop reads them once the next step is
        queued. Otherwise ``loss`` and the gradient norm reach the host in one
        synchronisation, before the optimizer decides.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        if not skip and self._skips_on_device(grad_norm):
            nonfinite = self._step_unless_nonfinite(loss, grad_norm)
            lr = float(self.scheduler.get_last_lr()[0])
            self.zero_grad()
            self.scheduler.step()
            return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "nonfinite": nonfinite}
        fetched = step_values_on_host({"loss": loss, "grad_norm": grad_norm})
        loss, grad_norm = fetched["loss"], fetched["grad_norm"]
        lr = float(self.scheduler.get_last_lr()[0])
        loss_finite = math.isfinite(loss)
        if self.scaler is not None:
            # An inf gradient under fp16 is the scaler's business (it lowers the scale and
            # skips); only a non-finite loss is a real failure.
            nonfinite = not loss_finite
            if loss_finite and not skip:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            nonfinite = not (loss_finite and math.isfinite(grad_norm))
            if not nonfinite and not skip:
                self.optimizer.step()
        self.zero_grad()
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "nonfinite": float(nonfinite)}

    def _skips_on_device(self, grad_norm: Any) -> bool:
        """Whether this step can leave the non-finite check to the optimizer's kernel: one
        process (with several, the units' all-reduce syncs each step anyway), no fp16 loss
        scaler (it owns ``found_inf``), a plain tensor norm, and an optimizer that honours
        ``found_inf`` (torch's fused Adam, AdamW and SGD: the protocol GradScaler uses)."""
        import torch

        return (self.optimizer_is_plain and self.dist.world_size == 1 and self.scaler is None
                and type(grad_norm) is torch.Tensor
                and getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _step_unless_nonfinite(self, loss: Any, grad_norm: Any) -> Any:
        """``optimizer.step()`` that the kernel itself skips, parameters, moments and step
        count alike, when the loss or the norm is not finite; returns that flag (0-d, 1.0 =
        skipped) without waiting for it."""
        import torch

        finite = torch.isfinite(grad_norm.detach())
        if isinstance(loss, torch.Tensor):
            finite = finite & torch.isfinite(loss.detach().to(finite.device))
        else:
            finite = finite & math.isfinite(loss)
        nonfinite = (~finite).to(torch.float32)
        self.optimizer.found_inf = nonfinite
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        return nonfinite

    def zero_grad(self) -> None:
        """Drop the step's gradients (a wrapper that keeps them in buckets zeroes them there)."""
        self.optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self) -> Any:
        """The gradients' total norm before clipping (a tensor); clips when max_grad_norm > 0.

        Sharded backends override it: their norm must be summed over every rank's shard.
        """
        import torch

        if self.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _mean_over_ranks(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Metrics averaged over ranks; on one process they stay as they are (tensors
        included: the loop fetches them with the step's other numbers)."""
        if not metrics or self.dist.world_size == 1:
            return metrics
        keys = sorted(metrics)
        summed = self.all_reduce_sum([float(metrics[k]) for k in keys])
        return {k: v / self.dist.world_size for k, v in zip(keys, summed)}

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move tensors to the device; ``_``-prefixed keys are metadata and stay as they are."""
        non_blocking = self.device.type == "cuda"
        return {key: value.to(self.device, non_blocking=non_blocking)
                if hasattr(value, "to") and not key.startswith("_") else value
                for key, value in batch.items()}

    def enter_train_mode(self) -> None:
        """``model.train()``, only when this backend put the model in eval mode (or never set
        it): the walk over every module costs milliseconds of host time on a LoRA model
        (thousands of modules), time a GPU step that waits on its host pays in full."""
        if not self._in_train_mode:
            self.model.train()
            self._in_train_mode = True

    def enter_eval_mode(self, module: Any = None) -> None:
        (self.model if module is None else module).eval()
        self._in_train_mode = False

    # -- evaluation -----------------------------------------------------------------------
    def eval_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        import torch

        self.enter_eval_mode()
        with torch.no_grad(), self.precision.autocast():
            summed, count, _ = self.method.loss(self.model, self.to_device(batch))
        return float(summed), int(count)

    # -- state ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        import torch
        from safetensors.torch import save_model

        if not self.dist.is_main:  # single and ddp hold identical replicas: rank 0 writes
            return
        folder = Path(path)
        # save_model (not save_file) de-duplicates tied weights such as embeddings/lm_head.
        save_model(self.unwrapped, str(folder / MODEL_WEIGHTS))
        torch.save(self.engine_state(), folder / ENGINE_STATE)

    def engine_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, path: str) -> None:
        import torch
        from safetensors.torch import load_model

        folder = Path(path)
        load_model(self.unwrapped, str(folder / MODEL_WEIGHTS), device=str(self.device))
        state = torch.load(folder / ENGINE_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def export(self, path: str, tokenizer: Any) -> None:
        if self.dist.is_main:
            config = getattr(self.unwrapped, "config", None)
            if self.config_use_cache is not None:
                config.use_cache = self.config_use_cache  # generation wants its cache back
            try:
                export_hf_folder(self.unwrapped, tokenizer, path, self.export_dtype)
            finally:
                if self.config_use_cache:
                    config.use_cache = False
        self.barrier()


def needs_full_reference_copy(recipe: Any) -> bool:
    """Whether the method will copy the whole starting model as its frozen reference
    (``panda.plugins.methods.reference.choose_reference``: dpo without [lora] or
    precompute_ref), which needs the model built whole on every rank."""
    return (recipe.lora is None
            and getattr(recipe.method.options, "precompute_ref", None) is False)


def refuse_full_reference_copy(options: Any, recipe: Any, option: str, why: str) -> None:
    """Refuse ``backend.<option> = true`` (in the backend's ``options``) with a method that
    copies the whole model as its reference; ``why`` says what that model cannot give."""
    from panda.recipe_schema import InvalidKey

    if getattr(options, option, None) is True and needs_full_reference_copy(recipe):
        raise InvalidKey(("backend", option), f"method '{recipe.method.name}' without [lora] "
                         f"or precompute_ref keeps a frozen copy of the full weights, {why}; "
                         f"set backend.{option} = false, method.precompute_ref = true, or "
                         "add [lora]")


def _floating_dtype(model: Any) -> Any:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def is_peft_model(model: Any) -> bool:
    return any(cls.__name__ == "PeftModel" for cls in type(model).__mro__)


def export_hf_folder(model: Any, tokenizer: Any, path: str, dtype: Any = None,
                     state_dict: dict[str, Any] | None = None) -> None:
    """Save ``model`` as a Hugging Face folder, weights in ``dtype`` (the dtype it was built in).

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded
    backend passes the full weights it gathered; ``model`` then supplies config and code).
    """
    import torch

    if is_peft_model(model):  # LoRA: the adapter folder is the product, not merged weights
        from panda.adapters import save_adapter

        save_adapter(model, path, state_dict=state_dict, tokenizer=tokenizer)
        return
    if not hasattr(model, "save_pretrained"):
        raise PandaError(f"cannot export a {type(model).__name__} as a Hugging Face folder",
                         hint="the model plugin must build a transformers PreTrainedModel")
    state = state_dict
    if dtype is not None and dtype != torch.float32:
        # Master weights are fp32; ship them in the dtype the model came in.
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in (model.state_dict() if state is None else state).items()}
    generation = getattr(model, "generation_config", None)
    if generation is not None and tokenizer is not None:
        for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if getattr(generation, field, None) is None:
                setattr(generation, field, getattr(tokenizer, field, None))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small folder: a progress bar is noise in the log
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    if dtype is not None and dtype != torch.float32:
        # save_pretrained records the in-memory (fp32) dtype; say what the files hold.
        original = model.config.dtype
        model.config.dtype = dtype
        try:
            model.config.save_pretrained(path)
        finally:
            model.config.dtype = original
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
