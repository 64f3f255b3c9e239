"""Sharded safetensors checkpoints, read and written one tensor at a time.

merge-lora, make-delta and apply-delta handle models far larger than host
memory (LLaMA-65B is 130 GB in bf16), so none of them loads a model: they read
one tensor at a time from memory-mapped safetensors files (:class:`ShardedWeights`),
write through a buffer of at most one shard (:class:`ShardWriter`), and build the
result in a hidden folder that is renamed into place only when it is complete
(:func:`staged_output`), so a crash or a wrong argument never leaves a
half-written model that looks finished, and never touches the user's own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from panda.errors import PandaError, UsageError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Top-level files that hold weights (or describe where weights are): never copied
# as "config/tokenizer" files from one model folder to another.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.index\.json$")

# safetensors dtype codes -> torch dtype names
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, read from the file header (no data loaded)."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "bfloat16", "float32", ...

    @property
    def shape_text(self) -> str:
        return "[" + ", ".join(map(str, self.shape)) + "]"


class ShardedWeights:
    """The safetensors weights of a model folder: an index with shards, or one file.

    Tensors are read one at a time from memory-mapped files, so reading a
    65B-parameter folder costs the memory of the largest tensor, not the model.
    """

    def __init__(self, folder: str | os.PathLike, role: str = "model"):
        self.folder = Path(folder)
        self.role = role  # "base", "delta", ... -- names the folder in error messages
        if not self.folder.is_dir():
            raise UsageError(f"{role} folder not found: {self.folder}")
        self.file_of: dict[str, str] = self._tensor_files()
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def _tensor_files(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise PandaError(f"{index}: not a safetensors index ({exc})") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise PandaError(f"{self.role} folder {self.folder} is incomplete: {INDEX_NAME} "
                                 f"names {missing[0]}, which is not there")
            self._check_index(weight_map)
            return dict(weight_map)
        single = self.folder / SINGLE_NAME
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                return {name: SINGLE_NAME for name in handle.keys()}
        hint = None
        if any(self.folder.glob("*.bin")):
            hint = ("convert it to safetensors first, e.g. load it with transformers and "
                    "save_pretrained(..., safe_serialization=True)")
        raise PandaError(f"{self.role} folder {self.folder} has no safetensors weights "
                         f"({INDEX_NAME} or {SINGLE_NAME})", hint=hint)

    def _check_index(self, weight_map: dict[str, str]) -> None:
        from safetensors import safe_open

        for file in sorted(set(weight_map.values())):
            with safe_open(str(self.folder / file), framework="pt") as handle:
                held = set(handle.keys())
            absent = sorted(n for n, f in weight_map.items() if f == file and n not in held)
            if absent:
                raise PandaError(f"{self.role} folder {self.folder} is inconsistent: "
                                 f"{INDEX_NAME} puts '{absent[0]}' in {file}, which does not "
                                 "hold it")

    # -- reading ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names, grouped file by file (the order reads are cheapest in)."""
        return sorted(self.file_of, key=lambda name: (self.file_of[name], name))

    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = self._stack.enter_context(
                safe_open(str(self.folder / file), framework="pt"))
        return self._handles[file]

    def info(self, name: str) -> TensorInfo:
        sliced = self._handle(self.file_of[name]).get_slice(name)
        code = sliced.get_dtype()
        return TensorInfo(tuple(sliced.get_shape()), _DTYPE_NAMES.get(code, code.lower()))

    def get(self, name: str) -> "torch.Tensor":
        return self._handle(self.file_of[name]).get_tensor(name)

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first shard (safetensors' free-form strings)."""
        return self._handle(self.files()[0]).metadata() or {}

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "ShardedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` shards plus the index.

    Tensors are buffered until the next one would push the shard past
    ``max_shard_bytes``; then the shard is written and its memory released.
    Shard file names need the final count, so shards are renamed in ``close``.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, "torch.Tensor"] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        # A view of a bigger tensor would keep the whole storage alive in the buffer.
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() > size:
            tensor = tensor.clone()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temporary = f"shard-{len(self._written) + 1:05d}.partial"
        save_file(self._buffer, str(self.folder / temporary), metadata=self.metadata)
        self._written.append((temporary, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> None:
        """Write the last shard, give every shard its final name, write the index."""
        if self._buffer or not self._written:
            self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for number, (temporary, names) in enumerate(self._written, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.folder / temporary).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n",
                                              encoding="utf-8")


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2 * 1024**3; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"bad size '{text}': expected e.g. 500MB or 2GB")
    unit = (match.group(2) or "B").upper().replace("I", "").rstrip("B") or "B"
    scale = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    return max(1, int(float(match.group(1)) * scale))


def copy_model_files(source: Path, destination: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the top-level files of a model folder that are not weights: config,
    generation config, tokenizer files, chat template. Returns the names copied."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if not path.is_file() or _WEIGHT_FILE.match(path.name) or path.name in skip:
            continue
        shutil.copy2(path, Path(destination) / path.name)
        copied.append(path.name)
    return copied


def check_output_is_not_an_input(output: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, holds or sits inside one of the inputs:
    replacing it would destroy what is being read."""
    out = Path(output).resolve()
    for role, path in inputs.items():
        source = Path(path).resolve()
        if out == source or source in out.parents or out in source.parents:
            raise UsageError(f"the output folder {output} overlaps the {role} folder {path}",
                             hint="write the result to a folder of its own")


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden folder beside ``output`` to build the result in; rename it to
    ``output`` on success, delete it on failure.

    A non-empty ``output`` is refused unless ``overwrite``: a folder the user
    trained is never replaced by accident.
    """
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"output folder {target} is not empty",
                         hint="choose another folder, or pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = target.parent / f".{target.name}.replaced-{os.getpid()}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
