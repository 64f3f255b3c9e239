"""Delta weights: ``target = base + delta``, tensor by tensor, shard by shard.

PandaLLM (like Vicuna) publishes fine-tuned LLaMA models as deltas, because
the LLaMA weights may not be redistributed: whoever has the base adds the delta.
``make_delta`` writes such a delta, ``apply_delta`` turns one back into a model.
Both stream one tensor at a time through memory-mapped safetensors, so memory
stays near one shard whatever the model size.

The delta folder ("panda delta", version 1)
--------------------------------------------
* ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``: one
  delta tensor per model tensor, under the model tensor's name, with the
  *target's* shape.
* ``panda_delta.json``: for every tensor, the base shape, base dtype and a
  digest of the base tensor's bytes, and the target dtype.
* the target's config, generation config and tokenizer files.

Exactness. ``apply_delta(base, make_delta(base, target))`` reproduces the
target bit for bit, for every tensor and dtype. A plain difference cannot
promise that: in the target's own dtype ``b + (t - b)`` differs from ``t`` for
~0.2-20 % of bf16 elements (wherever ``t - b`` needs more mantissa bits than
bf16 has). So:

* the delta of a floating tensor is kept in a wider dtype: float32 for
  bf16/fp16/fp32 targets (float64 when either side is float64), computed as
  ``delta = t.float() - b.float()``;
* the target is rebuilt as ``(b.float() + delta).to(target dtype)``
  (:func:`reconstruct`: both tools run this very function);
* ``make_delta`` rebuilds every tensor right away and compares bit patterns;
  the rare elements that still differ (where ``|t|`` is ~2^16 times smaller
  than ``|b|`` for bf16 targets, ~2^24 for fp32; none in typical checkpoints)
  are stored as exact fix-ups next to the tensor (``NAME:exact_index`` with flat
  int64 indices, ``NAME:exact_value`` with the target's values), and
  ``apply_delta`` writes them back.
* Non-floating tensors (integer buffers) are stored whole.

The float32 delta of a bf16 model is twice the model's size: that is the price
of exactness (a bf16 delta would need fix-ups for up to a fifth of all weights).

Enlarged vocabulary. A target tensor may have more rows than the base tensor
of the same name (new tokens in ``embed_tokens`` / ``lm_head``): the delta
holds ``t - b`` for the base's rows and the extra rows of ``t`` whole, as the
FastChat and LLaVA deltas do.

Checks. Names, shapes and dtypes are compared from the file headers before a
byte is written, and each base tensor's digest while it is read; the first
problem is raised as a PandaError naming the tensor. A folder without
``panda_delta.json`` is read as a plain delta (FastChat / PandaLLM
``apply_delta.py`` style): ``t = (b.float() + d.float()).to(d.dtype)``, names
and shapes checked, nothing more to check against.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from panda.errors import PandaError
from panda.models.shards import (DEFAULT_MAX_SHARD_BYTES, ShardedWeights, ShardWriter,
                                 TensorInfo, check_output_is_not_an_input, copy_model_files,
                                 staged_output)

if TYPE_CHECKING:
    import torch

DELTA_INFO = "panda_delta.json"
FORMAT = "panda-delta"
VERSION = 1
FIX_INDEX = ":exact_index"
FIX_VALUE = ":exact_value"

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, current name)


@dataclass
class DeltaReport:
    """What a make/apply run did; the CLI prints it."""

    folder: Path
    tensors: int = 0
    enlarged: list[str] = field(default_factory=list)  # tensors with extra (whole) rows
    exact_fixes: int = 0  # elements stored/restored verbatim
    plain_delta: bool = False  # apply only: the delta had no panda_delta.json


# -- the arithmetic both directions share ------------------------------------------------------

def delta_dtype(base_dtype: "torch.dtype", target_dtype: "torch.dtype") -> "torch.dtype":
    """The dtype a floating delta is stored and added in."""
    import torch

    return torch.float64 if torch.float64 in (base_dtype, target_dtype) else torch.float32


def reconstruct(base: "torch.Tensor", delta: "torch.Tensor", target_dtype: "torch.dtype"
                ) -> "torch.Tensor":
    """``(base + delta).to(target_dtype)`` in the delta's dtype; rows past the base's are
    the delta's own (an enlarged vocabulary). Returns a new tensor."""
    total = delta.clone()
    if base.dim() == 0:
        total += base.to(delta.dtype)
    else:
        total[: base.shape[0]] += base.to(delta.dtype)
    return total.to(target_dtype)


def _bit_pattern(tensor: "torch.Tensor") -> "torch.Tensor":
    """The tensor's bits as integers, so -0.0 != 0.0 and NaN payloads compare exactly."""
    import torch

    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    return tensor.reshape(-1).view(as_int[tensor.element_size()])


def _digest(tensor: "torch.Tensor") -> str:
    import torch

    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def _is_float(dtype_name: str) -> bool:
    return dtype_name.startswith(("float", "bfloat"))


# -- make -------------------------------------------------------------------------------------

def make_delta(base: str | Path, target: str | Path, delta: str | Path, *,
               overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               progress: Optional[Progress] = None) -> DeltaReport:
    """Write ``delta`` such that :func:`apply_delta` (base, delta) rebuilds ``target``
    bit for bit. Copies the target's config and tokenizer files into ``delta``."""
    check_output_is_not_an_input(Path(delta), {"base": Path(base), "target": Path(target)})
    with ShardedWeights(base, "base") as base_weights, \
            ShardedWeights(target, "target") as target_weights:
        _check_make_inputs(base_weights, target_weights)
        with staged_output(delta, overwrite) as staging:
            report = DeltaReport(Path(delta))
            writer = ShardWriter(staging, max_shard_bytes, metadata={"panda": FORMAT})
            entries: dict[str, dict] = {}
            names = target_weights.names
            for done, name in enumerate(names):
                if progress:
                    progress(done, len(names), name)
                entries[name] = _make_one(name, base_weights.get(name), target_weights.get(name),
                                          writer, report)
            writer.close()
            copy_model_files(target_weights.folder, staging, skip=(DELTA_INFO,))
            info = {"format": FORMAT, "version": VERSION,
                    "rule": "target = (base.to(delta dtype) + delta).to(target_dtype); rows past "
                            "the base's are the delta's own; then NAME:exact_index/value are "
                            "written back",
                    "tensors": entries}
            (staging / DELTA_INFO).write_text(json.dumps(info, indent=1) + "\n",
                                              encoding="utf-8")
            if progress:
                progress(len(names), len(names), "")
    return report


def _make_one(name: str, base: "torch.Tensor", target: "torch.Tensor", writer: ShardWriter,
              report: DeltaReport) -> dict:
    entry = {"base_shape": list(base.shape), "base_dtype": str(base.dtype).removeprefix("torch."),
             "target_dtype": str(target.dtype).removeprefix("torch."), "base_digest": _digest(base)}
    report.tensors += 1
    if tuple(base.shape) != tuple(target.shape):
        report.enlarged.append(name)
    if not (target.is_floating_point() and base.is_floating_point()):
        entry["whole"] = True
        writer.add(name, target)
        return entry
    wide = delta_dtype(base.dtype, target.dtype)
    difference = target.to(wide, copy=True)
    if base.dim() == 0:
        difference -= base.to(wide)
    else:
        difference[: base.shape[0]] -= base.to(wide)
    rebuilt = reconstruct(base, difference, target.dtype)
    wrong = (_bit_pattern(rebuilt) != _bit_pattern(target)).nonzero().reshape(-1)
    if wrong.numel():
        writer.add(name + FIX_INDEX, wrong)
        writer.add(name + FIX_VALUE, target.reshape(-1)[wrong])
        entry["exact_fixes"] = int(wrong.numel())
        report.exact_fixes += int(wrong.numel())
    writer.add(name, difference)
    return entry


def _check_make_inputs(base: ShardedWeights, target: ShardedWeights) -> None:
    _check_same_names(base, target, "target")
    for name in target.names:
        base_info, target_info = base.info(name), target.info(name)
        _check_rows(name, base_info, target_info.shape, "the target")
        if _is_float(base_info.dtype) != _is_float(target_info.dtype) or (
                not _is_float(base_info.dtype) and base_info.dtype != target_info.dtype):
            raise PandaError(f"tensor '{name}': the base is {base_info.dtype}, the target "
                             f"{target_info.dtype}; a delta needs both floating or both the same")


# -- apply ------------------------------------------------------------------------------------

def apply_delta(base: str | Path, delta: str | Path, target: str | Path, *,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                progress: Optional[Progress] = None) -> DeltaReport:
    """Write ``target = base + delta`` as safetensors shards with an index, and the
    delta's config and tokenizer files. Checks first that ``base`` is the model the
    delta was made from (names, shapes, dtypes; contents by digest while reading)."""
    check_output_is_not_an_input(Path(target), {"base": Path(base), "delta": Path(delta)})
    with ShardedWeights(base, "base") as base_weights, \
            ShardedWeights(delta, "delta") as delta_weights:
        entries = _read_delta_info(Path(delta))
        names = [n for n in delta_weights.names if not n.endswith((FIX_INDEX, FIX_VALUE))]
        _check_apply_inputs(base_weights, delta_weights, names, entries)
        with staged_output(target, overwrite) as staging:
            report = DeltaReport(Path(target), plain_delta=entries is None)
            writer = ShardWriter(staging, max_shard_bytes)
            for done, name in enumerate(names):
                if progress:
                    progress(done, len(names), name)
                entry = entries[name] if entries is not None else None
                writer.add(name, _apply_one(name, base_weights, delta_weights, entry, report))
            writer.close()
            copy_model_files(delta_weights.folder, staging, skip=(DELTA_INFO,))
            if progress:
                progress(len(names), len(names), "")
    return report


def _apply_one(name: str, base_weights: ShardedWeights, delta_weights: ShardedWeights,
               entry: dict | None, report: DeltaReport) -> "torch.Tensor":
    base = base_weights.get(name)
    delta = delta_weights.get(name)
    report.tensors += 1
    if tuple(base.shape) != tuple(delta.shape):
        report.enlarged.append(name)
    if entry is None:  # a plain delta: add in float32, keep the delta's dtype
        if not delta.is_floating_point():
            return delta
        return reconstruct(base, delta.to(delta_dtype(base.dtype, delta.dtype)), delta.dtype)
    if _digest(base) != entry["base_digest"]:
        raise PandaError(f"base tensor '{name}' is not the one this delta was made from (its "
                         "contents differ)", hint="is --base exactly the model the delta was "
                         "made from (same release and conversion)?")
    if entry.get("whole"):
        return delta
    target = reconstruct(base, delta, _dtype(entry["target_dtype"]))
    if entry.get("exact_fixes"):
        indices = delta_weights.get(name + FIX_INDEX)
        target.reshape(-1)[indices] = delta_weights.get(name + FIX_VALUE)
        report.exact_fixes += int(indices.numel())
    return target


def _read_delta_info(folder: Path) -> dict[str, dict] | None:
    path = folder / DELTA_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PandaError(f"{path}: not valid JSON ({exc})") from None
    if info.get("format") != FORMAT or not isinstance(info.get("tensors"), dict):
        raise PandaError(f"{path}: not a panda delta description")
    if info.get("version", 0) > VERSION:
        raise PandaError(f"{path}: delta format version {info['version']} is newer than this "
                         f"panda reads ({VERSION})", hint="upgrade pandallm")
    return info["tensors"]


def _check_apply_inputs(base: ShardedWeights, delta: ShardedWeights, names: list[str],
                        entries: dict[str, dict] | None) -> None:
    if entries is not None:
        unlisted = sorted(set(names) ^ set(entries))
        if unlisted:
            raise PandaError(f"delta folder {delta.folder} is inconsistent: tensor "
                             f"'{unlisted[0]}' is in only one of the weights and {DELTA_INFO}")
    _check_same_names(base, delta, "delta", names)
    for name in names:
        base_info, delta_info = base.info(name), delta.info(name)
        if entries is None:
            _check_rows(name, base_info, delta_info.shape, "the delta")
            continue
        entry = entries[name]
        recorded = TensorInfo(tuple(entry["base_shape"]), entry["base_dtype"])
        if base_info.shape != recorded.shape:
            raise PandaError(f"tensor '{name}': the base has shape {base_info.shape_text}, the "
                             f"delta was made from shape {recorded.shape_text}",
                             hint="is --base the model the delta was made from?")
        if base_info.dtype != recorded.dtype:
            raise PandaError(f"tensor '{name}': the base is {base_info.dtype}, the delta was made "
                             f"from {recorded.dtype}", hint="use the base in the dtype the delta "
                             "was made from; an exact rebuild needs the same bits")
        _check_rows(name, base_info, delta_info.shape, "the delta")


# -- checks shared by both directions ---------------------------------------------------------

def _check_same_names(base: ShardedWeights, other: ShardedWeights, role: str,
                      names: list[str] | None = None) -> None:
    other_names = set(names if names is not None else other.names)
    for missing, has, lacks in ((sorted(other_names - set(base.names)), role, "base"),
                                (sorted(set(base.names) - other_names), "base", role)):
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PandaError(f"tensor '{missing[0]}' is in the {has} but not in the {lacks}{more}",
                             hint="are --base and --" + role + " the same architecture?")


def _check_rows(name: str, base: TensorInfo, shape: tuple[int, ...], what: str) -> None:
    """Same shape, or more rows and otherwise the same (an enlarged vocabulary)."""
    if shape == base.shape:
        return
    if len(shape) == len(base.shape) and len(shape) >= 1 and shape[1:] == base.shape[1:] \
            and shape[0] > base.shape[0]:
        return
    shape_text = "[" + ", ".join(map(str, shape)) + "]"
    raise PandaError(f"tensor '{name}': {what} has shape {shape_text}, the base "
                     f"{base.shape_text}; only extra rows (an enlarged vocabulary) can differ")
