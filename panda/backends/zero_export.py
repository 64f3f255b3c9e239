"""Hugging Face folders out of DeepSpeed: from a live engine, or from a saved ZeRO checkpoint.

* ``export_engine``: at the end of training. ZeRO 0-2 keep a full copy of the
  weights on every rank; ZeRO-3 holds only a shard, so the weights are
  gathered one module at a time (``deepspeed.zero.GatheredParameters``) and
  rank 0 copies each to host memory: a rank never holds more than one
  module's full parameters on its device.
* ``convert_zero_checkpoint``: ``panda convert zero-to-hf`` for any checkpoint
  the ``deepspeed`` backend saved; it merges the fp32 master partitions with
  DeepSpeed's ``zero_to_fp32`` utilities (stage 0 reads the module state).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from panda.errors import UsageError


# -- from a live engine ---------------------------------------------------------------------

def export_engine(engine: Any, zero_stage: int, tokenizer: Any, path: str, dtype: Any,
                  is_main: bool) -> None:
    """Every rank calls this; rank 0 writes ``path``."""
    state = gathered_state_dict(engine.module) if zero_stage == 3 else None
    if not is_main:
        return
    if state is None:
        state = {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}
    save_hf_folder(engine.module, state, tokenizer, path, dtype)


def gathered_state_dict(module: Any) -> dict[str, Any] | None:
    """The full state of a ZeRO-3 module on rank 0 (None elsewhere); every rank must call it."""
    import deepspeed
    import torch.distributed as dist

    is_main = dist.get_rank() == 0
    state: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        # Gather this module's own parameters only: one module at a time on the device.
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if is_main:
                for name, param in sub.named_parameters(recurse=False):
                    state[_join(prefix, name)] = param.detach().cpu().clone()
        if is_main:
            for name, buffer in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    state[_join(prefix, name)] = buffer.detach().cpu().clone()
    return state if is_main else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- writing the folder ---------------------------------------------------------------------

def save_hf_folder(model: Any, state: dict[str, Any], tokenizer: Any, path: str,
                   dtype: Any = None) -> None:
    """``model.save_pretrained`` with an explicit state (cast to ``dtype``), then the tokenizer;
    a LoRA (peft) model writes its adapter folder. One writer for every backend."""
    from panda.backends.base import export_hf_folder

    export_hf_folder(model, tokenizer, path, dtype, state_dict=state)


# -- from a saved checkpoint ----------------------------------------------------------------

def find_engine_checkpoint(source: Path) -> tuple[Path, str, Path | None]:
    """(DeepSpeed save folder, tag, folder with config + tokenizer or None) under ``source``.

    ``source`` may be a panda checkpoint (``step-N``), its ``deepspeed`` folder,
    or any folder DeepSpeed's ``save_checkpoint`` wrote (a ``latest`` file or one tag).
    """
    from panda.backends.deepspeed import ENGINE_DIR, ENGINE_TAG, HF_META_DIR

    meta = source / HF_META_DIR if (source / HF_META_DIR).is_dir() else None
    if (source / ENGINE_DIR).is_dir():
        source = source / ENGINE_DIR
    if meta is None and (source.parent / HF_META_DIR).is_dir():
        meta = source.parent / HF_META_DIR
    if (source / "latest").is_file():
        return source, (source / "latest").read_text().strip(), meta
    if (source / ENGINE_TAG).is_dir():
        return source, ENGINE_TAG, meta
    tags = [p.name for p in source.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))] \
        if source.is_dir() else []
    if len(tags) == 1:
        return source, tags[0], meta
    if any(source.glob("*model_states.pt")):  # the tag folder itself
        return source.parent, source.name, meta or (
            source.parent.parent / HF_META_DIR if (source.parent.parent / HF_META_DIR).is_dir()
            else None)
    raise UsageError(f"{source} is not a DeepSpeed checkpoint (no 'latest' file, no tag "
                     "folder with *model_states.pt)",
                     hint="pass a step-N folder that the deepspeed backend saved")


def checkpoint_state_dict(save_dir: Path, tag: str) -> dict[str, Any]:
    """The full fp32 weights of a DeepSpeed checkpoint (ZeRO 1-3 merged; stage 0 as saved)."""
    import torch

    folder = save_dir / tag
    optim_files = sorted(folder.glob("*zero_pp_rank_*optim_states.pt"))
    if optim_files and _zero_stage(optim_files[0]) > 0:
        from deepspeed.utils import zero_to_fp32

        with _safe_loads(zero_to_fp32):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    model_files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise UsageError(f"{folder} holds no mp_rank_*_model_states.pt")
    saved = safe_load(model_files[0])
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()
            if isinstance(v, torch.Tensor)}


def _zero_stage(optim_file: Path) -> int:
    state = safe_load(optim_file)["optimizer_state_dict"]
    return int(state.get("zero_stage", 0)) if isinstance(state, dict) else 0


# DeepSpeed pickles a few of its own objects next to the tensors of a checkpoint; these are
# allowed, nothing else (DESIGN section 6: nothing unsafe is loaded by default).
DEEPSPEED_CHECKPOINT_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _allowed_classes() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(module), name)
            for module, name in DEEPSPEED_CHECKPOINT_CLASSES]


def safe_load(path: Path | str, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only``: tensors, containers and DeepSpeed's few classes."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path} holds more than weights and DeepSpeed's state ({first}); "
                         "panda does not unpickle arbitrary objects",
                         hint="convert it with DeepSpeed's own zero_to_fp32.py if you trust "
                         "where it came from") from None


class _SafeTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 module sees it, with ``load`` made safe."""

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, **_: Any) -> Any:
        return safe_load(f, map_location=map_location)


@contextmanager
def _safe_loads(module: Any) -> Iterator[None]:
    """zero_to_fp32 calls ``torch.load(..., weights_only=False)``: safe loads, for the call."""
    original = module.torch
    module.torch = _SafeTorch()
    try:
        yield
    finally:
        module.torch = original


def convert_zero_checkpoint(source: str, destination: str, config: str | None = None,
                            dtype: str | None = None) -> Path:
    """Write an HF folder at ``destination`` from the DeepSpeed checkpoint at ``source``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from panda.backends.deepspeed import import_deepspeed

    import_deepspeed("panda convert zero-to-hf")
    save_dir, tag, meta = find_engine_checkpoint(Path(source))
    meta_dir = Path(config) if config else meta
    if meta_dir is None:
        raise UsageError(f"{source} has no {'hf-meta'} folder to take the model config from",
                         hint="pass --config with a Hugging Face folder of the same architecture")
    state = checkpoint_state_dict(save_dir, tag)
    model_config = AutoConfig.from_pretrained(meta_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    tokenizer = None
    if any((meta_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(meta_dir)
    # fp32 master weights leave in the dtype the model came in, as the end-of-run export does
    target_dtype = getattr(torch, dtype) if dtype else _config_dtype(model_config)
    save_hf_folder(model, state, tokenizer, destination, target_dtype)
    return Path(destination)


def _config_dtype(config: Any) -> Any:
    import torch

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
