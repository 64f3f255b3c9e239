"""A model folder (and optionally a LoRA adapter folder) -> tokenizer and causal LM.

Folders must be local: inference never downloads. The adapter is merged into
the weights at load time, so generation runs at the base model's speed and
every backend (including the tensor-parallel ones, which shard plain Linear
layers) sees an ordinary model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from panda.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_model_folder(path: str, flag: str = "--model") -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: no such folder",
                         hint="pass a local Hugging Face model folder (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{flag} {path}: not a Hugging Face model folder (no config.json)")
    return folder


def check_adapter_folder(path: str) -> Path:
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {path}: not a peft adapter folder (no adapter_config.json)")
    return folder


def resolve_dtype(name: str, device_type: str) -> "torch.dtype":
    """``auto`` is bfloat16 on a GPU (fp16 where bf16 is missing) and float32 on the CPU."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(model_path: str, adapter: str | None = None, *, trust_remote_code: bool = False
                   ) -> Any:
    """The adapter's tokenizer when it saved one (training may add tokens), else the model's."""
    from transformers import AutoTokenizer

    source = model_path
    if adapter and any((Path(adapter) / name).is_file()
                       for name in ("tokenizer.json", "tokenizer_config.json")):
        source = adapter
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                              local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(model_path: str, *, dtype: "torch.dtype", device_map: Any = None,
                   attn: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    check_model_folder(model_path)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code,
                                  local_files_only=True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.eval()
    return model


def merge_adapter(model: Any, adapter: str) -> Any:
    """Apply a peft (LoRA) adapter and fold it into the weights."""
    from peft import PeftModel

    check_adapter_folder(adapter)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    model = model.merge_and_unload()
    model.eval()
    return model


def context_length(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return getattr(config, "max_position_embeddings", None)
