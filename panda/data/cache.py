"""Where prepared data lives, what names it, and who builds it when several ranks start.

Every artifact (a source's tokens, a split's packing plan) lives in a folder
named by a fingerprint of everything it depends on, so a rerun finds it and a
changed input, tokenizer, template, max_seq_length or method misses it. The
root is ``$PANDA_CACHE``, else ``~/.cache/panda/data``.

Artifacts are built in a temporary folder and renamed into place: a folder
under its final name is complete. With several processes (torchrun), the
first process of each node builds; the others poll for the folder to appear
(DESIGN §6: tokenizing finishes before ranks wait on each other in a
collective with a timeout). A builder that fails leaves ``<name>.failed`` with
its message, so the waiting ranks stop with the same error instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from panda.errors import DataError, PandaError

CACHE_VERSION = 1  # bump when the stored layout or the encoding rules change
POLL_SECONDS = 0.5
# A ``.failed`` mark older than this process (minus a margin for a builder that failed
# while this one was starting) is left over from an earlier run and is not ours.
_STARTED = time.time() - 60


def cache_root() -> Path:
    return Path(os.environ.get("PANDA_CACHE") or Path.home() / ".cache" / "panda" / "data")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_fingerprint(path: str) -> list[Any]:
    """Identity of an input file: absolute path, size, modification time (ns).

    Hashing content would read every byte on every run; size + mtime catches
    every edit made through the file system, and is what make and pip use.
    """
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the ids: the tokenizer's full definition and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary stands in for its definition
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {name: str(getattr(tokenizer, name, None)) for name in
               ("bos_token", "eos_token", "pad_token", "unk_token")}
    return fingerprint(type(tokenizer).__name__, definition, special)


def is_builder() -> bool:
    """Whether this process builds the cache: the first process of its node.

    torchrun sets LOCAL_RANK; without it (one process, or a launcher that sets
    only RANK) rank 0 builds. Nodes that share a file system may both build;
    the atomic rename keeps one result.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return int(local_rank) == 0
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0


def build_or_wait(folder: Path, build: Callable[[Path], None], *, what: str,
                  wait_seconds: float | None = None) -> bool:
    """Make sure ``folder`` is complete: built here by ``build(tmp)``, or by another process.

    Returns whether this process built it.
    """
    if folder.is_dir():
        return False
    failed = folder.with_name(folder.name + ".failed")
    if not is_builder():
        _wait_for(folder, failed, what, wait_seconds)
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            message = exc.message if isinstance(exc, PandaError) else f"{type(exc).__name__}: {exc}"
            failed.write_text(message, encoding="utf-8")
        raise
    try:
        os.rename(tmp, folder)
    except OSError:  # another node's builder got there first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise
        return False
    return True


def _wait_for(folder: Path, failed: Path, what: str, wait_seconds: float | None) -> None:
    limit = wait_seconds if wait_seconds is not None else float(
        os.environ.get("PANDA_DATA_WAIT_S", 24 * 3600))
    start = time.monotonic()
    while not folder.is_dir():
        if failed.exists() and failed.stat().st_mtime >= _STARTED:
            raise DataError(failed.read_text(encoding="utf-8"))
        if time.monotonic() - start > limit:
            raise DataError(f"waited {limit:.0f} s for {what} to appear in {folder}",
                            hint="the first process of this node builds it; see its log, "
                            "or set PANDA_DATA_WAIT_S")
        time.sleep(POLL_SECONDS)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
