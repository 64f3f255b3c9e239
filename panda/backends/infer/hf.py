"""``hf``: a transformers causal LM in one process, with fast decoding on one GPU.

Placement: the CPU when there is no GPU; one GPU; or, with several GPUs,
``device_map="auto"`` (accelerate spreads the layers over them -- naive model
parallelism, one GPU busy at a time, for models too large for one card).

Decoding on a single CUDA device uses a static KV cache and a decode step
compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) when the
architecture declares a compile-safe forward (``fast_decode = "auto"``); the
first batch of a new shape pays the compile (tens of seconds), later ones
replay the graph.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from panda.backends.infer.base import TransformersBackend, TransformersOptions
from panda.infer.decode import StaticDecoding


class HFOptions(TransformersOptions):
    device_map: str = Field("auto", description="Where the weights go: auto (one GPU, several "
                            "GPUs split by layer, or the CPU), cpu, cuda, cuda:N.")
    fast_decode: Literal["auto", "on", "off"] = Field(
        "auto", description="Static KV cache + compiled decode step; auto = on a single GPU "
        "for architectures that support it.")
    compile: bool = Field(True, description="Compile the decode step when fast_decode is on "
                          "(off: the static cache alone, e.g. to debug).")
    compile_mode: Literal["reduce-overhead", "default", "max-autotune",
                          "max-autotune-no-cudagraphs"] = Field(
        "reduce-overhead", description="torch.compile mode; reduce-overhead captures CUDA graphs.")
    loop: Literal["panda", "generate"] = Field(
        "panda", description="Decoding loop: panda's (streams batches, fast_decode) or "
        "transformers' generate (for architectures panda's loop cannot drive).")


class HFBackend(TransformersBackend):
    """transformers in one process: CPU, one GPU, or device_map=auto over several GPUs."""

    Options = HFOptions

    def build_model(self, model_path: str, adapter: str | None) -> Any:
        import torch

        from panda.infer.loading import load_causal_lm, merge_adapter, resolve_dtype

        device_map = self.options.device_map
        if device_map == "auto":
            gpus = torch.cuda.device_count()
            device_map = "auto" if gpus > 1 else ("cuda:0" if gpus == 1 else "cpu")
        device_type = "cuda" if device_map == "auto" or device_map.startswith("cuda") else "cpu"
        dtype = resolve_dtype(self.options.dtype, device_type)
        model = load_causal_lm(model_path, dtype=dtype, device_map=device_map,
                               attn=self.options.attn,
                               trust_remote_code=self.options.trust_remote_code)
        if adapter:
            model = merge_adapter(model, adapter)
        self.uses_hf_generate = self.options.loop == "generate"
        return model

    def static_decoding(self) -> StaticDecoding | None:
        mode = self.options.fast_decode
        if mode == "off" or self.uses_hf_generate:
            return None
        on_one_gpu = not _spread_over_devices(self.model) and self.model.device.type == "cuda"
        supported = StaticDecoding.supported(self.model)
        if mode == "auto" and not (on_one_gpu and supported):
            return None
        if mode == "on" and not supported:
            from panda.errors import UsageError

            raise UsageError(f"fast_decode=on: {type(self.model).__name__} does not declare a "
                             "compile-safe forward", hint="use --option fast_decode=off")
        return StaticDecoding(self.model, compile=self.options.compile,
                              mode=self.options.compile_mode)


def _spread_over_devices(model: Any) -> bool:
    device_map = getattr(model, "hf_device_map", None) or {}
    return len(set(device_map.values())) > 1
