"""``fairscale``: FairScale's sharded training, kept for recipes that name it.

FairScale is unmaintained (last release 0.4.13, 2022); new recipes should use
``fsdp`` (PyTorch FSDP2), which does what FairScale's FSDP did and is tested
with every torch release. Two modes:

* ``oss`` (default): ZeRO-2-style. Each rank keeps a full replica of the
  weights; the optimizer state is sharded by ``OSS`` (each rank steps the
  parameters it owns, then broadcasts them) and ``ShardedDataParallel``
  reduces each gradient only to the rank that owns it. Runs on GPUs (NCCL) and
  on the CPU (gloo).
* ``fsdp``: FairScale's FullyShardedDataParallel, one unit per transformer
  block plus the root (ZeRO-3). CUDA only: FairScale's FSDP asserts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from panda.backends.base import ENGINE_STATE, MODEL_WEIGHTS, _floating_dtype, export_hf_folder
from panda.backends.ddp import Ddp
from panda.errors import PandaError, require
from panda.plugins.api import Options

FSDP_ONLY_OPTIONS = ("reshard_after_forward", "cpu_offload")


class FairscaleOptions(Options):
    mode: Literal["oss", "fsdp"] = Field("oss", description="oss: optimizer state sharded "
                                         "(OSS) and gradients reduced to their owner "
                                         "(ShardedDataParallel), CPU or GPU; fsdp: FairScale's "
                                         "FullyShardedDataParallel per transformer block, CUDA "
                                         "only.")
    reshard_after_forward: bool = Field(True, description="mode fsdp: free each block's "
                                        "gathered weights after its forward pass (less "
                                        "memory, one more all-gather in backward).")
    cpu_offload: bool = Field(False, description="mode fsdp: keep the fp32 weight shards and "
                              "gradients in CPU memory; the optimizer steps on the CPU.")


class Fairscale(Ddp):
    """FairScale (unmaintained; prefer fsdp): OSS + ShardedDataParallel, or FairScale FSDP on GPUs."""

    Options = FairscaleOptions
    # ShardedDataParallel and FairScale's FSDP both average gradients over ranks.
    averages_gradients_over_ranks = True
    optimizer_is_plain = False  # OSS wraps the optimizer; FairScale FSDP flattens shards

    @classmethod
    def check_recipe(cls, options: FairscaleOptions, recipe: Any) -> None:
        from panda.recipe_schema import InvalidKey

        if options.mode == "oss":
            for key in FSDP_ONLY_OPTIONS:
                if key in options.model_fields_set:
                    raise InvalidKey(("backend", key), "applies to mode = \"fsdp\" only; "
                                     "remove it or set backend.mode = \"fsdp\"")
        optim = recipe.optim
        if optim.name == "nvlamb" and (options.mode == "fsdp" or
                                       getattr(optim.options, "grad_pre_normalization", False)):
            raise InvalidKey(("optim", "name"), _NVLAMB_PROBLEM[options.mode])
        if optim.name == "adafactor" and options.mode == "fsdp":
            raise InvalidKey(("optim", "name"), "adafactor factors each weight matrix's "
                             "statistics, but FairScale's FSDP hands the optimizer flat 1-D "
                             "shards: it would silently run unfactored; use adamw or lion, or "
                             "backend fsdp")
        if recipe.train.compile and options.mode == "fsdp":
            raise InvalidKey(("train", "compile"), "FairScale's FSDP predates torch.compile "
                             "(its flattened parameters and hooks are not traceable); use "
                             "backend fsdp to compile")

    # -- lifecycle ------------------------------------------------------------------------
    def init_distributed(self) -> Any:
        import torch

        if self.options.mode == "fsdp" and not torch.cuda.is_available():
            raise PandaError("backend 'fairscale' with mode = \"fsdp\" needs CUDA GPUs: "
                             "FairScale's FullyShardedDataParallel asserts CUDA",
                             hint="on the CPU use backend.mode = \"oss\", or backend fsdp "
                             "(PyTorch FSDP2 runs on CPU and GPU)")
        return super().init_distributed()

    def setup(self, job: Any) -> None:
        """Precision, device, (compile), then the mode's optimizer and wrapper, then the schedule.

        OSS must exist before ShardedDataParallel (the wrapper routes each gradient to the
        rank whose optimizer shard owns it); FairScale's FSDP must wrap before the optimizer
        (the optimizer steps the flat shards FSDP creates).
        """
        import torch

        from panda.backends.fsdp import ShardedPrecision
        from panda.backends.precision import Precision

        fairscale = _require_fairscale()
        self.job = job
        self.dist = job.dist
        self.method = job.method
        self.device = torch.device(self.dist.device)
        # OSS replicas compute under autocast; FairScale's FSDP casts the weights itself.
        self.precision = ShardedPrecision(Precision(job.recipe.train.precision,
                                                    self.device.type),
                                          casts_weights=self.options.mode == "fsdp")
        model = job.model
        self.export_dtype = _floating_dtype(model)
        # No KV cache in training (as in TorchBackend.setup): packed documents stay apart.
        self.config_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        if self.config_use_cache:
            model.config.use_cache = False
        self.precision.prepare_model(model)
        self.unwrapped = model
        if self.options.mode == "oss":
            model.to(self.device)
            if job.recipe.train.compile:
                model.compile()
            self.optimizer = sharded_optimizer(fairscale, job, model)
            self.model = fairscale.nn.data_parallel.ShardedDataParallel(model, self.optimizer)
        else:
            if not self.options.cpu_offload:  # offloaded shards must start in CPU memory
                model.to(self.device)
            self.model = wrap_fully_sharded(fairscale, model, self.options,
                                            self.precision.name, self.device)
            self.optimizer = job.build_optimizer(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scheduler = job.build_scheduler(self.optimizer)
        self.scaler = self.precision.grad_scaler()
        self.max_grad_norm = job.recipe.optim.max_grad_norm

    # -- one step -------------------------------------------------------------------------
    def gradient_sync(self, last_micro_batch: bool) -> Any:
        from contextlib import nullcontext

        if self.options.mode == "oss" and not last_micro_batch:
            # Like DDP: accumulate locally, reduce once on the last micro-batch.
            return self.model.no_sync()
        # FSDP reduce-scatters every micro-batch: skipping it would hold a full gradient.
        return nullcontext()

    def zero_grad(self) -> None:
        if self.options.mode == "oss":
            # ShardedDataParallel reduces gradients through buckets the .grad tensors are
            # views of; set to None, the next backward would fill fresh tensors instead and
            # the buckets would send stale sums. Its own zero_grad keeps the views.
            self.model.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self) -> Any:
        # Each rank holds only some of the gradients (its OSS partition, or its FSDP shard):
        # both FairScale helpers sum the norm over ranks. A max of inf measures, never clips.
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        if self.options.mode == "oss":
            return self.optimizer.clip_grad_norm(max_norm)
        return self.model.clip_grad_norm_(max_norm)

    def eval_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        if self.options.mode == "fsdp":
            return super().eval_step(batch)
        import torch

        # Every rank holds all the weights: evaluate the bare model. Through the wrapper,
        # eval mode reads as a change of trainable parameters, and ShardedDataParallel would
        # rebuild its gradient hooks (and warn) at every switch between eval and train.
        self.enter_eval_mode(self.unwrapped)
        with torch.no_grad(), self.precision.autocast():
            summed, count, _ = self.method.loss(self.unwrapped, self.to_device(batch))
        return float(summed), int(count)

    def close(self) -> None:
        super().close()
        # FairScale FSDP keeps its process groups in a cache on a function; once the default
        # group is destroyed they are dead, and a second run in this process (a notebook, a
        # test session) would hang on them. The next run must build fresh ones.
        from fairscale.internal.parallel import get_process_group_cached

        if hasattr(get_process_group_cached, "_global_group_cache"):
            del get_process_group_cached._global_group_cache

    # -- state ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        if self.options.mode == "oss":
            self._save_replica_and_consolidated_optimizer(Path(path))
        else:
            self._save_local_shards(Path(path))

    def _save_replica_and_consolidated_optimizer(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        # Every rank sends its optimizer shard to rank 0, which writes one full state that
        # any OSS partition can load.
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        if self.dist.is_main:
            weights, _tied = unshared_weights(self.unwrapped)
            save_file(weights, str(folder / MODEL_WEIGHTS))
            torch.save({"optimizer": self.optimizer.state_dict(), **self._schedule_state()},
                       folder / ENGINE_STATE)

    def _save_local_shards(self, folder: Path) -> None:
        import torch

        # Each rank writes its own flat shards of weights and optimizer state: nothing is
        # gathered, so saving costs no more memory than training. Resuming needs the same
        # number of ranks (the checkpointer checks).
        torch.save({"model": self.model.local_state_dict(),
                    "optimizer": self.optimizer.state_dict()},
                   folder / shard_file(self.dist.rank))
        if self.dist.is_main:
            torch.save(self._schedule_state(), folder / ENGINE_STATE)

    def _schedule_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, path: str) -> None:
        import torch

        folder = Path(path)
        if self.options.mode == "oss":
            if not (folder / MODEL_WEIGHTS).is_file():
                raise _not_mine(folder, MODEL_WEIGHTS)
            load_replica(self.unwrapped, folder / MODEL_WEIGHTS)
            state = torch.load(folder / ENGINE_STATE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])  # keeps this rank's partition
        else:
            own = folder / shard_file(self.dist.rank)
            if not own.is_file():
                raise _not_mine(folder, own.name)
            shards = torch.load(own, map_location=self.device, weights_only=True)
            self.model.load_local_state_dict(shards["model"])
            self.optimizer.load_state_dict(shards["optimizer"])
            state = torch.load(folder / ENGINE_STATE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def export(self, path: str, tokenizer: Any) -> None:
        if self.options.mode == "fsdp":
            # Every rank takes part in gathering the full weights (to CPU memory).
            full = self.model.state_dict()
        else:
            full = unshared_weights(self.unwrapped, keep_tied=True)[0] if self.dist.is_main \
                else None
        if self.dist.is_main:
            config = self.unwrapped.config
            if self.config_use_cache is not None:
                config.use_cache = self.config_use_cache  # generation wants its cache back
            try:
                export_hf_folder(self.unwrapped, tokenizer, path, self.export_dtype,
                                 state_dict=full)
            finally:
                if self.config_use_cache:
                    config.use_cache = False
        self.barrier()


_NVLAMB_PROBLEM = {
    "oss": "nvlamb pre-normalizes by the norm of all gradients, but OSS steps each rank's "
           "share of the parameters with its own optimizer, which would see only its share; "
           "set optim.grad_pre_normalization = false, or use backend fsdp or ddp",
    "fsdp": "nvlamb takes a trust ratio per weight tensor, but FairScale's FSDP hands the "
            "optimizer flat shards that mix tensors; use backend fsdp (PyTorch FSDP2 keeps "
            "each tensor whole to the optimizer) or ddp",
}


def shard_file(rank: int) -> str:
    return f"fairscale-shard-{rank:05d}.pt"


def _not_mine(folder: Path, missing: str) -> PandaError:
    return PandaError(f"{folder} is not a checkpoint of this fairscale mode (no {missing})",
                      hint="resume with the backend and mode that wrote it")


def _require_fairscale() -> Any:
    fairscale = require("fairscale", what="backend 'fairscale'", package="FairScale",
                        extra="fairscale")
    import fairscale.nn.data_parallel  # noqa: F401  (the wrappers live in submodules)
    import fairscale.optim  # noqa: F401

    return fairscale


def unshared_weights(model: Any, keep_tied: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The replica's weights as tensors of their own, and the names left out as tied.

    OSS turns the parameters each rank owns into views of one flat buffer (it broadcasts
    the buffer after each step), and safetensors refuses views that do not cover their
    storage. Tied weights (one parameter under two names) are copied once: the first name
    keeps them; ``keep_tied`` maps the other names to the same copy (transformers'
    save_pretrained recognises ties that way), else they are left out.
    """
    copies: dict[tuple, Any] = {}
    weights, tied = {}, []
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in copies:
            tied.append(name)
            if keep_tied:
                weights[name] = copies[key]
            continue
        weights[name] = copies[key] = tensor.detach().clone().contiguous().cpu()
    return weights, tied


def load_replica(model: Any, path: Path) -> None:
    """Copy saved weights into the model's own tensors (so OSS's flat buffers stay in place)."""
    from safetensors.torch import load_file

    _weights, tied = unshared_weights(model)
    result = model.load_state_dict(load_file(str(path)), strict=False)
    missing = sorted(set(result.missing_keys) - set(tied))
    if missing or result.unexpected_keys:
        raise PandaError(f"{path} does not fit the model: missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]}",
                         hint="resume with the recipe that wrote the checkpoint")


def sharded_optimizer(fairscale: Any, job: Any, model: Any) -> Any:
    """OSS over the recipe's optimizer: each rank builds the plugin's optimizer on its share.

    OSS takes an optimizer *class*; a small factory stands in for it so any optimizer
    plugin works, with the same weight-decay groups as every other backend.
    """
    from panda.plugins.optimizers import param_groups

    plugin, lr = job.optimizer_plugin, job.recipe.optim.lr

    def build_share(share: list[dict[str, Any]], **_defaults: Any) -> Any:
        return plugin.build(share, lr)

    groups = param_groups(model, job.recipe.optim.weight_decay)
    return fairscale.optim.OSS(groups, optim=build_share, lr=lr)


def wrap_fully_sharded(fairscale: Any, model: Any, options: FairscaleOptions,
                       precision: str, device: Any) -> Any:
    """FairScale FSDP around each transformer block, then around the whole model.

    Mixed precision keeps an fp32 master shard (what the optimizer updates) and
    computes in bf16/fp16; gradients are reduce-scattered in fp32, and buffers stay
    fp32 (rotary frequencies rounded to bf16 would shift every position).
    """
    import torch

    from panda.backends.fsdp import transformer_blocks

    FSDP = fairscale.nn.data_parallel.FullyShardedDataParallel
    mixed = precision in ("bf16", "fp16")
    settings = dict(reshard_after_forward=options.reshard_after_forward,
                    mixed_precision=mixed, fp32_reduce_scatter=mixed,
                    compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                    buffer_dtype=torch.float32, move_params_to_cpu=options.cpu_offload,
                    compute_device=device, state_dict_device=torch.device("cpu"))
    for parent, name in transformer_blocks(model):
        parent.register_module(name, FSDP(parent.get_submodule(name), **settings))
    return FSDP(model, **settings)
