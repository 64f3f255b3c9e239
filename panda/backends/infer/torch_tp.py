"""``torch-tp``: torch's native tensor parallelism (DTensor), one process per GPU.

Each rank loads the full checkpoint on the CPU, merges the adapter, moves the
model to its GPU and shards it with ``parallelize_module``, following the
architecture's own tensor-parallel plan from transformers
(``config.base_model_tp_plan``: q/k/v and gate/up split by output column,
o/down by input row, so each block needs two all-reduces). Embeddings and the
LM head stay replicated, so every rank computes the full logits and the
decode loop is the same as on one GPU; tokens are still broadcast from rank 0
so sampling cannot drift apart.

Degree 1 (no torchrun) runs the same DTensor code in a group of one; degree N
is ``panda infer --backend torch-tp --nproc N``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field

from panda.backends.infer.base import TransformersBackend, TransformersOptions
from panda.errors import UsageError
from panda.infer.decode import StaticDecoding


class TorchTPOptions(TransformersOptions):
    fast_decode: Literal["on", "off"] = Field(
        "off", description="Static KV cache + compiled decode step on sharded modules "
        "(experimental with DTensor; off = dynamic cache).")
    compile: bool = Field(True, description="Compile the decode step when fast_decode is on.")


class TorchTP(TransformersBackend):
    """torch native tensor parallelism (DTensor) over one process per GPU."""

    Options = TorchTPOptions
    multi_process = True

    def build_model(self, model_path: str, adapter: str | None) -> Any:
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from panda.infer.distributed import join_process_group
        from panda.infer.loading import load_causal_lm, merge_adapter, resolve_dtype

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        rank, degree, local_rank = join_process_group(device_type)
        self.is_main_process = rank == 0
        device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
        model = load_causal_lm(model_path, dtype=resolve_dtype(self.options.dtype, device_type),
                               attn=self.options.attn,
                               trust_remote_code=self.options.trust_remote_code)
        if adapter:
            model = merge_adapter(model, adapter)
        check_divisible(model.config, degree)
        model.to(device)
        mesh = init_device_mesh(device_type, (degree,), mesh_dim_names=("tp",))
        base = getattr(model, model.base_model_prefix)
        parallelize_module(base, mesh, torch_plan(model.config))
        return model

    def static_decoding(self) -> StaticDecoding | None:
        if self.options.fast_decode == "off":
            return None
        return StaticDecoding(self.model, compile=self.options.compile)

    def agree(self) -> Callable | None:
        from panda.infer.distributed import broadcast_tokens, world_size

        return broadcast_tokens if world_size() > 1 else None

    def close(self) -> None:
        from panda.infer.distributed import leave_process_group

        super().close()
        leave_process_group()


def torch_plan(config: Any) -> dict[str, Any]:
    """transformers' per-architecture plan (module pattern -> style) as torch ParallelStyles."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    plan = getattr(text_config, "base_model_tp_plan", None) or {}
    if not plan:
        raise UsageError(f"torch-tp: model type '{config.model_type}' has no tensor-parallel plan "
                         "in transformers", hint="use --backend hf or --backend ds")
    unsupported = sorted({style for style in plan.values() if style not in styles})
    if unsupported:
        raise UsageError(f"torch-tp: model type '{config.model_type}' needs tensor-parallel "
                         f"styles panda does not map yet: {', '.join(unsupported)}",
                         hint="use --backend hf or --backend ds")
    return {pattern: styles[style]() for pattern, style in plan.items()}


def check_divisible(config: Any, degree: int) -> None:
    """Heads and MLP width must split evenly, or the shards would not be equal."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_key_value_heads": getattr(text_config, "num_key_value_heads", None),
        "intermediate_size": getattr(text_config, "intermediate_size", None),
    }
    for name, size in sizes.items():
        if size is not None and size % degree:
            raise UsageError(f"torch-tp: {name}={size} does not divide by the tensor-parallel "
                             f"degree {degree}", hint="choose --nproc that divides it")
