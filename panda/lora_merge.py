"""Fold a LoRA adapter into full weights, one base tensor at a time (``panda merge-lora``).

Loading a 65B base to call peft's ``merge_and_unload`` needs 130 GB of memory;
this streams instead: each base tensor is read from its safetensors shard, the
adapted ones get ``W + scale * B @ A`` (computed in float32, written back in the
base tensor's dtype), and shards are written as they fill. Memory: one shard
plus the adapter (memory-mapped).

Tolerance. The merged model's logits equal the adapter model's up to float
rounding: the merge rounds each merged weight once to the base dtype, where the
adapter model instead rounds ``x @ W`` and ``x @ A @ B`` separately. Asserted
by tests/lora/test_lora_merge.py: ``max |merged - adapter| <= tol * max |logit|``
with tol = 1e-5 for a float32 base (observed ~1e-6) and tol = 5e-2 for a
bfloat16 base (observed <= 1.5e-2: bf16 keeps 8 mantissa bits, and the adapter
model's own bf16 logits are no closer than that to exact arithmetic).

Supported adapters: peft LoRA on linear layers (``fan_in_fan_out`` too) and on
embeddings, ``rank_pattern``/``alpha_pattern``, rsLoRA scaling, and whole
tensors saved with the adapter (``modules_to_save``, or an embedding saved with
more rows for added tokens: config.json's ``vocab_size`` follows). DoRA,
LoRA biases, layer replication and trainable-token adapters are refused with a
message rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from panda.errors import PandaError, UsageError
from panda.models.shards import (DEFAULT_MAX_SHARD_BYTES, ShardedWeights, ShardWriter,
                                 check_output_is_not_an_input, copy_model_files, staged_output)

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
# adapter key -> (module path, what it is); tried in order
_KEY_KINDS = [
    (re.compile(r"(.+)\.lora_A\.weight$"), "A"),
    (re.compile(r"(.+)\.lora_B\.weight$"), "B"),
    (re.compile(r"(.+)\.lora_embedding_A$"), "embedding_A"),
    (re.compile(r"(.+)\.lora_embedding_B$"), "embedding_B"),
    (re.compile(r"(.+)\.base_layer\.(weight|bias)$"), "whole"),
]
_REFUSED_FEATURES = {"use_dora": "DoRA", "lora_bias": "LoRA biases",
                     "layer_replication": "layer replication",
                     "trainable_token_indices": "trainable tokens",
                     "target_parameters": "LoRA on parameters (target_parameters)"}

Progress = Callable[[int, int, str], None]


@dataclass
class LoraUpdate:
    """What happens to one base tensor."""

    whole: Optional[str] = None  # adapter key of a tensor replacing the base one
    a_key: Optional[str] = None
    b_key: Optional[str] = None
    embedding: bool = False  # lora_embedding_A/B: delta is (B @ A).T
    scale: float = 0.0


@dataclass
class MergeReport:
    folder: Path
    tensors: int = 0
    merged: list[str] = field(default_factory=list)  # base tensors with LoRA folded in
    replaced: list[str] = field(default_factory=list)  # taken whole from the adapter
    vocab_size: Optional[int] = None  # set when the adapter enlarged the vocabulary


class AdapterWeights:
    """The tensors of a peft adapter folder, read lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        safetensors_file, bin_file = (folder / name for name in ADAPTER_FILES)
        if safetensors_file.is_file():
            from safetensors import safe_open

            self._handle = safe_open(str(safetensors_file), framework="pt")
            self.names = list(self._handle.keys())
        elif bin_file.is_file():
            import torch

            self._handle = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
            self.names = list(self._handle)
        else:
            raise UsageError(f"adapter folder {folder} has no {' or '.join(ADAPTER_FILES)}")

    def get(self, name: str) -> "torch.Tensor":
        if isinstance(self._handle, dict):
            return self._handle[name]
        return self._handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self._handle, dict):
            return tuple(self._handle[name].shape)
        return tuple(self._handle.get_slice(name).get_shape())


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise UsageError(f"{folder} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PandaError(f"{path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise PandaError(f"{path}: a {config.get('peft_type')} adapter; merge-lora merges LoRA")
    for key, what in _REFUSED_FEATURES.items():
        if config.get(key):
            raise PandaError(f"{path}: merge-lora cannot fold {what} ({key}) yet",
                             hint="merge with peft's merge_and_unload on a machine that holds "
                             "the whole model")
    return config


def plan_merge(config: dict, adapter: AdapterWeights, base: ShardedWeights
               ) -> dict[str, LoraUpdate]:
    """Base tensor name -> its update; checks every adapter tensor against the base."""
    from peft.utils.other import get_pattern_key

    plan: dict[str, LoraUpdate] = {}
    for key in adapter.names:
        inner = key.removeprefix(_PEFT_PREFIX)
        for pattern, kind in _KEY_KINDS:
            match = pattern.match(inner)
            if match:
                break
        else:
            if "lora_" in inner:
                raise PandaError(f"adapter tensor '{key}' is of a kind merge-lora does not know")
            kind, match = "whole", None  # a modules_to_save tensor, under the base's name
        if match is None:
            target = inner
        elif kind == "whole":
            target = f"{match.group(1)}.{match.group(2)}"
        else:
            target = f"{match.group(1)}.weight"
        if target not in base:
            raise PandaError(f"adapter tensor '{key}' belongs to '{target}', which the base "
                             "does not have", hint="is --base the model the adapter was "
                             "trained on? (tied embeddings are not merged)")
        update = plan.setdefault(target, LoraUpdate())
        if kind == "whole":
            _check_whole_shape(key, adapter.shape(key), target, base.info(target).shape)
            update.whole = key
        elif kind in ("A", "embedding_A"):
            update.a_key, update.embedding = key, kind == "embedding_A"
        else:
            update.b_key = key
    for target, update in plan.items():
        if (update.a_key is None) != (update.b_key is None):
            raise PandaError(f"adapter is incomplete: '{target}' has only one of lora_A/lora_B")
        if update.a_key is None:
            continue
        module = target.removesuffix(".weight")
        rank = adapter.shape(update.a_key)[0]
        rank_key = get_pattern_key((config.get("rank_pattern") or {}).keys(), module)
        alpha_key = get_pattern_key((config.get("alpha_pattern") or {}).keys(), module)
        expected_rank = (config.get("rank_pattern") or {}).get(rank_key, config["r"])
        alpha = (config.get("alpha_pattern") or {}).get(alpha_key, config["lora_alpha"])
        if rank != expected_rank:
            raise PandaError(f"adapter tensor '{update.a_key}' has rank {rank}, its config "
                             f"says {expected_rank}")
        update.scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        _check_lora_shapes(target, update, adapter, base, config.get("fan_in_fan_out", False))
    return plan


def _check_whole_shape(key: str, shape: tuple[int, ...], target: str,
                       base_shape: tuple[int, ...]) -> None:
    """A saved tensor replaces the base one: same shape, or more rows (added tokens)."""
    if shape == base_shape or (len(shape) == len(base_shape) >= 1 and shape[1:] == base_shape[1:]
                               and shape[0] > base_shape[0]):
        return
    raise PandaError(f"adapter tensor '{key}' has shape {list(shape)}, the base's '{target}' "
                     f"{list(base_shape)}", hint="is --base the model the adapter was trained on?")


def _check_lora_shapes(target: str, update: LoraUpdate, adapter: AdapterWeights,
                       base: ShardedWeights, fan_in_fan_out: bool) -> None:
    a, b = adapter.shape(update.a_key), adapter.shape(update.b_key)
    weight = adapter.shape(update.whole) if update.whole else base.info(target).shape
    if update.embedding:  # A: [r, rows], B: [cols, r], weight: [rows, cols]
        expected = (a[1], b[0])
    else:  # A: [r, in], B: [out, r], weight: [out, in] (or [in, out] with fan_in_fan_out)
        expected = (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])
    if tuple(weight) != expected:
        raise PandaError(f"adapter does not fit the base at '{target}': LoRA makes "
                         f"{list(expected)}, the weight is {list(weight)}",
                         hint="is --base the model the adapter was trained on?")


def merged_tensor(base_tensor: "torch.Tensor", update: LoraUpdate, adapter: AdapterWeights,
                  fan_in_fan_out: bool) -> "torch.Tensor":
    """``W + scale * B @ A`` in float32, returned in W's dtype."""
    weight = adapter.get(update.whole) if update.whole else base_tensor
    out_dtype = base_tensor.dtype
    if update.a_key is None:
        return weight.to(out_dtype)
    lora_a = adapter.get(update.a_key).float()
    lora_b = adapter.get(update.b_key).float()
    delta = lora_b @ lora_a
    if update.embedding or fan_in_fan_out:
        delta = delta.T
    merged = weight.float()  # a new tensor unless W is float32 already
    if merged.data_ptr() == weight.data_ptr():
        merged = merged.clone()
    merged.add_(delta, alpha=update.scale)
    return merged.to(out_dtype)


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, *, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: Optional[Progress] = None) -> MergeReport:
    """Write ``out_dir``: the base with the adapter folded in, as safetensors shards with
    an index, the base's config and generation config, and the tokenizer (the
    adapter folder's files win, as training may have added tokens)."""
    base_path, adapter_path = Path(base_dir), Path(adapter_dir)
    check_output_is_not_an_input(Path(out_dir), {"base": base_path, "adapter": adapter_path})
    config = read_adapter_config(adapter_path)
    adapter = AdapterWeights(adapter_path)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    with ShardedWeights(base_path, "base") as base:
        plan = plan_merge(config, adapter, base)
        report = MergeReport(Path(out_dir))
        with staged_output(out_dir, overwrite) as staging:
            writer = ShardWriter(staging, max_shard_bytes)
            rows_changed: dict[int, int] = {}  # old rows -> new rows of replaced tensors
            names = base.names
            for done, name in enumerate(names):
                if progress:
                    progress(done, len(names), name)
                tensor = base.get(name)
                update = plan.get(name)
                if update is not None:
                    merged = merged_tensor(tensor, update, adapter, fan_in_fan_out)
                    (report.merged if update.a_key else report.replaced).append(name)
                    if merged.dim() and merged.shape[0] != tensor.shape[0]:
                        rows_changed[tensor.shape[0]] = merged.shape[0]
                    tensor = merged
                writer.add(name, tensor)
                report.tensors += 1
            writer.close()
            copy_model_files(base_path, staging)
            copy_model_files(adapter_path, staging,
                             skip=(ADAPTER_CONFIG, "README.md", "config.json"))
            report.vocab_size = _update_vocab_size(staging / "config.json", rows_changed)
            if progress:
                progress(len(names), len(names), "")
    return report


def _update_vocab_size(config_file: Path, rows_changed: dict[int, int]) -> Optional[int]:
    """An adapter that saved an embedding with added tokens changes the vocabulary size."""
    if not rows_changed or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    new_size = rows_changed.get(config.get("vocab_size"))
    if new_size is None:
        return None
    config["vocab_size"] = new_size
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return new_size
