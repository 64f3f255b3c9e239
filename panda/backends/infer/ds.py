"""``ds``: DeepSpeed inference, tensor parallel over one process per GPU.

``deepspeed.init_inference`` with ``tensor_parallel.tp_size`` = the number of
processes. Without kernel injection DeepSpeed applies its automatic tensor
parallelism (AutoTP): it finds the attention-output and MLP-output Linear
layers of each block, splits every Linear of the block across ranks and
inserts the all-reduces, leaving the rest of the transformers model -- and so
its KV cache -- untouched. That keeps the model compatible with panda's decode
loop on transformers 5.

Kernel injection (``kernel_inject = true``) swaps whole blocks for DeepSpeed's
fused inference kernels, which keep their own KV cache; generation then goes
through the engine's ``generate`` (transformers' loop) instead of panda's.
It exists only for the architectures DeepSpeed has injection policies for.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from panda.backends.infer.base import TransformersBackend, TransformersOptions
from panda.errors import require


class DeepSpeedOptions(TransformersOptions):
    kernel_inject: bool = Field(False, description="Replace blocks with DeepSpeed's fused "
                                "inference kernels (architectures DeepSpeed supports only).")


class DeepSpeedInference(TransformersBackend):
    """DeepSpeed inference (init_inference, automatic tensor parallelism) over one process per GPU."""

    Options = DeepSpeedOptions
    multi_process = True

    def build_model(self, model_path: str, adapter: str | None) -> Any:
        deepspeed = require("deepspeed", what="infer backend 'ds'", package="DeepSpeed",
                            extra="deepspeed")
        import torch

        from panda.infer.distributed import join_process_group
        from panda.infer.loading import load_causal_lm, merge_adapter, resolve_dtype

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        rank, degree, _ = join_process_group(device_type)
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
        self.is_main_process = rank == 0
        dtype = resolve_dtype(self.options.dtype, device_type)
        model = load_causal_lm(model_path, dtype=dtype, attn=self.options.attn,
                               trust_remote_code=self.options.trust_remote_code)
        if adapter:
            model = merge_adapter(model, adapter)
        self.engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": degree}, dtype=dtype,
            replace_with_kernel_inject=self.options.kernel_inject)
        # Injected kernels keep their own KV cache, which only transformers' generate drives.
        self.uses_hf_generate = self.options.kernel_inject
        return self.engine.module

    def agree(self) -> Callable | None:
        from panda.infer.distributed import broadcast_tokens, world_size

        return broadcast_tokens if world_size() > 1 else None

    def close(self) -> None:
        from panda.infer.distributed import leave_process_group

        super().close()
        self.engine = None
        leave_process_group()
