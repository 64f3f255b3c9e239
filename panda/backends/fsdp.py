"""``fsdp``: PyTorch FSDP2 (``fully_shard``): weights, gradients and optimizer state sharded.

Each transformer block is its own FSDP unit (its weights are all-gathered just
before it runs and freed after), then the root takes what is left (embeddings,
final norm, head). Every rank keeps only its shard of the fp32 master weights
and of the optimizer state: that is where the memory goes with AdamW (16 bytes
per weight in fp32), so a model that does not fit one GPU with ``ddp`` fits N.

NCCL on GPUs, gloo on CPU (FSDP2's collectives all run on gloo; what needs
care on the CPU is noted where it is handled). Start it with ``panda train
RECIPE --nproc N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field

from panda.backends.base import (ENGINE_STATE, _floating_dtype, export_hf_folder,
                                 needs_full_reference_copy, refuse_full_reference_copy)
from panda.backends.ddp import Ddp
from panda.errors import PandaError
from panda.plugins.api import Options

SHARDED_STATE = "sharded"  # torch.distributed.checkpoint folder: model + optimizer shards

# FSDP2 hands the optimizer DTensor shards; these optimizers cannot update them.
OPTIMIZERS_WITHOUT_DTENSOR = {
    "adafactor": "adafactor (transformers) keeps its factored statistics as plain tensors, "
                 "which cannot update FSDP2's sharded (DTensor) weights; use adamw, lion or "
                 "nvlamb, or backend ddp",
    "adamw8bit": "adamw8bit (bitsandbytes) runs kernels on the raw memory of whole "
                 "parameters and fails on FSDP2's sharded (DTensor) weights (bitsandbytes "
                 "issue 1633); use adamw, lion or nvlamb, or backend ddp",
}


class FsdpOptions(Options):
    reshard_after_forward: bool = Field(True, description="Free each block's gathered weights "
                                        "after its forward pass and gather them again for "
                                        "backward (less memory); false keeps them until "
                                        "backward (less communication, ZeRO-2-like memory).")
    cpu_offload: bool = Field(False, description="Keep the weight shards, gradients and "
                              "optimizer state in CPU memory; the optimizer step runs on the "
                              "CPU. Fits larger models, runs slower.")
    activation_checkpointing: bool = Field(False, description="Recompute each transformer "
                                           "block's activations in backward instead of storing "
                                           "them.")
    load_on_rank0: Union[Literal["auto"], bool] = Field(
        "auto", description="Only rank 0 builds (or loads) the whole model; the others build "
        "it empty on the meta device and receive their shards from rank 0 after sharding, so "
        "host memory holds one copy of the model instead of one per rank. 'auto': with "
        "several ranks, unless the method keeps a frozen full copy of the weights (dpo "
        "without [lora] or precompute_ref), cpu_offload is on with GPUs, or the model plugin "
        "cannot build an empty model.")


class Fsdp(Ddp):
    """FSDP2 (fully_shard per transformer block): weights, gradients and optimizer state sharded."""

    Options = FsdpOptions
    # FSDP2's reduce-scatter averages gradients over ranks, like DDP; train_step undoes it.
    averages_gradients_over_ranks = True
    optimizer_is_plain = False  # its parameters are DTensor shards

    @classmethod
    def check_recipe(cls, options: FsdpOptions, recipe: Any) -> None:
        from panda.recipe_schema import InvalidKey

        model_options = recipe.model.options
        if options.activation_checkpointing and getattr(model_options, "gradient_checkpointing",
                                                        False):
            raise InvalidKey(("backend", "activation_checkpointing"),
                             "model.gradient_checkpointing already recomputes every block; "
                             "set one of the two, not both")
        if recipe.optim.name in OPTIMIZERS_WITHOUT_DTENSOR:
            raise InvalidKey(("optim", "name"), OPTIMIZERS_WITHOUT_DTENSOR[recipe.optim.name])
        refuse_full_reference_copy(options, recipe, "load_on_rank0", "on every rank, which "
                                   "an empty model cannot give")

    # -- the model ------------------------------------------------------------------------
    def build_model(self, model_plugin: Any, recipe: Any) -> Any:
        """The model plugin's model on rank 0; with ``load_on_rank0``, an empty (meta
        device) one on the other ranks, filled from rank 0 in ``setup``."""
        option = self.options.load_on_rank0
        # torch broadcasts the state dict on the shards' device: CPU shards cannot go
        # over NCCL.
        offloaded_on_gpu = self.options.cpu_offload and self.dist.device.startswith("cuda")
        if option is True and offloaded_on_gpu:
            raise PandaError("backend.load_on_rank0 = true does not work with cpu_offload on "
                             "GPUs yet", hint="set backend.load_on_rank0 = false (or \"auto\")")
        wanted = option is True or (option == "auto" and self.dist.world_size > 1
                                    and not offloaded_on_gpu
                                    and not needs_full_reference_copy(recipe))
        # Every rank asks, rank 0 included: all must agree whether the broadcast happens.
        build_empty = getattr(model_plugin, "build_empty", None)  # optional in the API
        empty = build_empty(recipe) if wanted and build_empty else None
        self.loads_on_rank0 = empty is not None
        if self.loads_on_rank0 and self.dist.rank != 0:
            return empty
        return model_plugin.build(recipe)

    # -- setup ----------------------------------------------------------------------------
    def setup(self, job: Any) -> None:
        """Precision, then per block: checkpointing, compile, shard; then the optimizer.

        The order is torchtitan's, and each step needs the one before it:

        1. fp32 master weights, before FSDP takes its shards of them (the shards are what
           the optimizer updates, so its state is fp32 too);
        2. activation checkpointing wraps each block first, so that the recomputation in
           backward runs inside the block's FSDP unit (FSDP gathers the weights again for it);
        3. torch.compile per block next: the blocks are identical, so one compiled graph
           serves them all, and compiling inside the FSDP unit keeps FSDP's all-gather and
           reduce-scatter hooks outside the graph, where they overlap with compute;
        4. ``fully_shard`` each block, then the root. The root goes last because it takes
           every parameter no block took; sharding moves each unit to the device one block
           at a time (no rank ever holds the whole model on the GPU);
        5. the optimizer, from the sharded (DTensor) parameters FSDP put in place.
        """
        import torch

        from panda.backends.precision import Precision

        self.job = job
        self.dist = job.dist
        self.method = job.method
        self.device = torch.device(self.dist.device)
        self.precision = ShardedPrecision(Precision(job.recipe.train.precision,
                                                    self.device.type))
        model = job.model
        self.export_dtype = _floating_dtype(model)
        self.precision.prepare_model(model)
        # No KV cache in training (as in TorchBackend.setup): with one, packed documents
        # would see each other, and a recomputation in backward would see the keys twice.
        self.config_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        if self.config_use_cache:
            model.config.use_cache = False
        # Rank 0's whole weights, kept past sharding for the other ranks' shards.
        full_state = model.state_dict() if self._fills_from_rank0() and self.dist.is_main else None
        blocks = transformer_blocks(model)
        if self.options.activation_checkpointing:
            blocks = [checkpoint_block(parent, name) for parent, name in blocks]
        if job.recipe.train.compile:
            blocks = [compile_block(parent, name) for parent, name in blocks]
        self.shard(model, blocks)
        if self._fills_from_rank0():
            self.fill_from_rank0(model, full_state)
        del full_state
        self.unwrapped = model
        self.model = model  # fully_shard works in place: the model is its own wrapper
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = job.build_optimizer(model)
        self.scheduler = job.build_scheduler(self.optimizer)
        self.scaler = self.precision.grad_scaler()
        self.max_grad_norm = job.recipe.optim.max_grad_norm

    def shard(self, model: Any, blocks: list[tuple[Any, str]]) -> None:
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        # Compute in bf16/fp16 from the fp32 shards; gradients are reduced in fp32 so the
        # sum over ranks loses nothing. fp32 runs leave both alone.
        policy = MixedPrecisionPolicy(param_dtype=self.precision.compute_dtype,
                                      reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
        if self.options.cpu_offload:
            # Pinned memory needs an accelerator; on a CPU-only host the shards are plain.
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for parent, name in blocks:
            fully_shard(parent.get_submodule(name),
                        reshard_after_forward=self.options.reshard_after_forward, **kwargs)
        # The root keeps its weights after forward whatever the option says (FSDP2's rule):
        # the head and embeddings are needed again first thing in backward.
        fully_shard(model, **kwargs)

    def _fills_from_rank0(self) -> bool:
        return getattr(self, "loads_on_rank0", False)

    def fill_from_rank0(self, model: Any, full_state: dict[str, Any] | None) -> None:
        """Give the empty ranks' shards storage, then rank 0's weights and buffers.

        Parameters and persistent buffers travel through torch's
        ``set_model_state_dict(..., broadcast_from_rank0=True)``, each rank keeping only
        its shard; buffers outside the state dict (rotary frequencies) are broadcast as
        they are, since an empty model's are uninitialised memory.
        """
        import torch
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)

        if not self.dist.is_main:
            model.to_empty(device=self.device)
        set_model_state_dict(model, full_state or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one step --------------------------------------------------------------------------
    def gradient_sync(self, last_micro_batch: bool) -> Any:
        """Reduce-scatter after every micro-batch (FSDP2's default), unlike DDP's no_sync.

        Accumulating unsharded gradients locally until the last micro-batch would hold a
        full gradient per rank, the very memory FSDP exists to save.
        """
        from contextlib import nullcontext

        return nullcontext()

    def clip_gradients(self) -> Any:
        import torch
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return torch.zeros(())
        # Each rank holds a shard of every gradient: the norm of the DTensors is a partial
        # sum until full_tensor() reduces it over ranks (torchtitan does the same).
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, self.max_grad_norm, norm)
        return norm

    # -- state: sharded checkpoints through torch.distributed.checkpoint -----------------
    def save(self, path: str) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = Path(path)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        # Every rank writes its own shards; rank 0 adds the metadata that maps them.
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(folder / SHARDED_STATE))
        if self.dist.is_main:  # schedule and loss scale are the same on every rank
            torch.save(self.engine_state(), folder / ENGINE_STATE)

    def engine_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, path: str) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        folder = Path(path)
        if not (folder / SHARDED_STATE).is_dir():
            raise PandaError(f"{folder} holds no FSDP checkpoint (no {SHARDED_STATE}/ folder)",
                             hint="resume an fsdp run from a checkpoint that fsdp wrote")
        # get_state_dict gives the shapes and shardings to read into (it creates the
        # optimizer state if no step has run yet); dcp.load fills them in place.
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder / SHARDED_STATE))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        engine = torch.load(folder / ENGINE_STATE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(engine["scheduler"])
        if self.scaler is not None and engine.get("scaler"):
            self.scaler.load_state_dict(engine["scaler"])

    def export(self, path: str, tokenizer: Any) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank takes part in gathering; with cpu_offload only rank 0 keeps the result,
        # in CPU memory, so the full model never sits on a GPU.
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
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


class ShardedPrecision:
    """``Precision`` for backends whose ranks hold different gradients (sharded ones).

    With ``casts_weights`` (FSDP's mixed precision: the fp32 shards are gathered as
    bf16/fp16 and every op of the block runs in that dtype) there is no autocast,
    as in torchtitan. fp16 gradients are unscaled shard by shard, so the loss scaler
    must agree across ranks on whether any shard overflowed: ShardedGradScaler
    all-reduces that verdict.
    """

    def __init__(self, precision: Any, casts_weights: bool = True):
        self.precision = precision
        self.name = precision.name
        self.casts_weights = casts_weights

    @property
    def compute_dtype(self) -> Any:
        from panda.backends.precision import AUTOCAST_DTYPES

        return AUTOCAST_DTYPES.get(self.name)

    def prepare_model(self, model: Any) -> None:
        self.precision.prepare_model(model)

    def autocast(self) -> Any:
        from contextlib import nullcontext

        return nullcontext() if self.casts_weights else self.precision.autocast()

    def grad_scaler(self) -> Any:
        if self.name != "fp16":
            return None
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.precision.device_type)


# -- the transforms applied per block ---------------------------------------------------------

def transformer_blocks(model: Any) -> list[tuple[Any, str]]:
    """(parent module, child name) of every transformer block, in model order.

    Blocks are the modules transformers itself never splits across devices
    (``_no_split_modules``: LlamaDecoderLayer, Qwen2DecoderLayer...); a model
    without that list falls back to the children of its largest ModuleList.
    """
    import torch

    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(parent, child_name)
             for parent in model.modules() for child_name, child in parent.named_children()
             if type(child).__name__ in names]
    if found:
        return found
    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise PandaError(f"fsdp found no transformer blocks in {type(model).__name__}",
                         hint="the model needs _no_split_modules or a ModuleList of blocks")
    largest = max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))
    return [(largest, name) for name, _ in largest.named_children()]


def checkpoint_block(parent: Any, name: str) -> tuple[Any, str]:
    """Replace the block by a wrapper that recomputes its activations in backward.

    The wrapper's state-dict hooks drop its ``_checkpoint_wrapped_module.`` prefix, so
    checkpoints and exports keep the model's own parameter names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    parent.register_module(name, checkpoint_wrapper(parent.get_submodule(name)))
    return parent, name


def compile_block(parent: Any, name: str) -> tuple[Any, str]:
    """Replace the block by its torch.compile'd version (state dicts strip ``_orig_mod.``)."""
    import torch

    parent.register_module(name, torch.compile(parent.get_submodule(name)))
    return parent, name
