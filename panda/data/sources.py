"""Reading, validating and tokenizing one source into its cached token store.

The steps per record: the plugin's reader (with ``path:line``), the plugin's
``Record`` model (missing fields, wrong types), rendering and batched
tokenization, then fitting into ``max_seq_length``. Bad records stop the run
with ``path:line: what is wrong``, or with ``data.on_bad_record = "skip"`` are
counted per file and reported; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from panda.data import cache
from panda.data.encoding import (EncodeContext, FitCounts, encode_pieces, fit_example, fit_pair,
                                 from_token_lists, join_pair)
from panda.data.readers import resolve_files
from panda.data.store import StoreWriter, TokenStore
from panda.errors import DataError
from panda.plugins.api import BadRecord, DatasetPlugin

log = logging.getLogger(__name__)
RECORDS_PER_BATCH = 2048  # records tokenized per call of the Rust tokenizer
TEXT_PER_BATCH = 8_000_000  # ... or fewer, once their text passes this many characters


@dataclass
class SourceStats:
    """What tokenizing one source found; ``panda data prepare`` prints it."""

    files: int = 0
    records: int = 0
    documents: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    split: int = 0
    no_target: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # file -> bad records skipped
    first_skipped: list[str] = field(default_factory=list)  # a few "path:line: why"


@dataclass
class TokenizedSource:
    store: TokenStore
    stats: SourceStats
    key: str  # the cache fingerprint
    from_cache: bool  # False when this process tokenized it


def tokenize_source(plugin: DatasetPlugin, plugin_name: str, path: Any, ctx: EncodeContext, *,
                    data_format: str, on_bad_record: str, where: str) -> TokenizedSource:
    """The source's token store, from the cache or built now, with its stats."""
    if plugin.data_format != data_format:
        raise DataError(f"{where}: dataset '{plugin_name}' gives {plugin.data_format} data but "
                        f"the method needs {data_format} data",
                        hint="use a preference dataset for pair methods (dpo, rm...), and an "
                        "instruction/chat/pretrain dataset for sft and pretrain")
    files = resolve_files(path, default=plugin.default_path, extensions=plugin.extensions,
                          where=f"{where}.path")
    key = cache.fingerprint(
        "tokens", plugin_name, type(plugin).__module__, type(plugin).__qualname__,
        plugin.options.model_dump(mode="json"), [cache.file_fingerprint(f) for f in files],
        cache.tokenizer_fingerprint(ctx.tokenizer), ctx.chat_template, ctx.max_seq_length,
        ctx.method, data_format, on_bad_record)
    folder = cache.cache_root() / "tokens" / key

    def build(tmp: Path) -> None:
        log.info("tokenizing %s (%d file(s)) into %s", where, len(files), folder)
        stats = _tokenize_files(plugin, files, ctx, tmp / "tokens.arrow", data_format=data_format,
                                on_bad_record=on_bad_record, where=where)
        cache.write_json(tmp / "stats.json", {"files_list": files, **asdict(stats)})

    built_here = cache.build_or_wait(folder, build, what=f"the tokens of {where}")
    raw = cache.read_json(folder / "stats.json")
    raw.pop("files_list", None)
    return TokenizedSource(TokenStore(str(folder / "tokens.arrow")), SourceStats(**raw), key,
                           from_cache=not built_here)


def _tokenize_files(plugin: DatasetPlugin, files: list[str], ctx: EncodeContext, out: Path, *,
                    data_format: str, on_bad_record: str, where: str) -> SourceStats:
    stats = SourceStats(files=len(files))
    counts = FitCounts()
    writer = StoreWriter(str(out), data_format)
    batch: list[tuple[str, int, int, dict]] = []  # (where, file index, line, record)
    batch_text = 0

    def bad(location: str, message: str) -> None:
        if on_bad_record == "error":
            raise DataError(f"{location}: {message}",
                            hint='fix the record, or set data.on_bad_record = "skip" to skip '
                            "bad records and count them")
        file = location.rsplit(":", 1)[0]
        stats.skipped[file] = stats.skipped.get(file, 0) + 1
        if len(stats.first_skipped) < 5:
            stats.first_skipped.append(f"{location}: {message}")

    def flush() -> None:
        nonlocal batch, batch_text
        for location, file, line, example in _encode(plugin, batch, ctx, bad):
            if data_format == "pair":
                fitted = fit_pair(example, ctx.max_seq_length, counts)
                pieces = [] if fitted is None else [join_pair(fitted)]
            else:
                pieces = fit_example(example, ctx.max_seq_length, plugin.long_documents, counts)
            for piece in pieces:
                writer.add(piece, file, line)
                _count_tokens(stats, piece)
        batch, batch_text = [], 0

    progress = _Progress(where)
    try:
        for file_index, file in enumerate(files):
            for location, raw in plugin.records(file):
                if isinstance(raw, BadRecord):
                    bad(location, str(raw))
                    continue
                stats.records += 1
                record = _validated(plugin, raw, location, bad)
                if record is None:
                    continue
                batch.append((location, file_index, _line_of(location), record))
                batch_text += _text_size(record)
                if len(batch) >= RECORDS_PER_BATCH or batch_text >= TEXT_PER_BATCH:
                    flush()
                    progress.report(stats.records)
        flush()
    finally:
        writer.close()
    stats.documents = writer.documents
    stats.truncated, stats.split, stats.no_target = counts.truncated, counts.split, counts.no_target
    if stats.documents == 0:
        raise DataError(f"{where}: no usable records in {_describe(files)} ({_summary(stats)})",
                        hint="check the path and the format (name) of the source")
    return stats


class _Progress:
    """A log line every few seconds while a large source is tokenized."""

    def __init__(self, where: str, every: float = 10.0):
        self.where, self.every = where, every
        self.started = self.last = time.monotonic()

    def report(self, records: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s: %d records tokenized (%.0f s)", self.where, records, now - self.started)


def _validated(plugin: DatasetPlugin, raw: dict, location: str, bad) -> dict | None:
    if plugin.Record is None:
        return raw
    try:
        return plugin.Record.model_validate(raw).model_dump()
    except ValidationError as exc:
        bad(location, describe_validation_error(exc, raw))
        return None


def describe_validation_error(exc: ValidationError, raw: dict) -> str:
    """One line for the first problem: ``missing field 'x'`` or ``field 'x': ... (got ...)``."""
    first = exc.errors()[0]
    field_path = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        have = ", ".join(raw) if raw else "none"
        return f"missing field '{field_path}' (the record has: {have})"
    got = repr(first.get("input"))
    got = got if len(got) <= 50 else got[:47] + "..."
    message = first["msg"].removeprefix("Value error, ")
    return f"field '{field_path}': {message} (got {got})"


def _encode(plugin: DatasetPlugin, batch: list, ctx: EncodeContext, bad):
    """(where, file, line, example) of each record of the batch that encodes."""
    renders_segments = type(plugin).encode is DatasetPlugin.encode
    kept, rendered = [], []
    for location, file, line, record in batch:
        try:
            if renders_segments:
                rendered.append(plugin.segments(record, ctx))
            else:
                rendered.append(from_token_lists(plugin.encode(record, ctx.tokenizer, ctx)))
        except BadRecord as exc:
            bad(location, str(exc))
            continue
        kept.append((location, file, line))
    examples = encode_pieces(ctx, rendered) if renders_segments else rendered
    if ctx.method == "pretrain":  # pretraining trains every token, prompts included
        examples = [_all_trained(example) for example in examples]
    for (location, file, line), example in zip(kept, examples):
        yield location, file, line, example


def _all_trained(example: Any) -> Any:
    if isinstance(example, dict):
        return example
    ids, _ = example
    return ids, [1] * len(ids)


def _count_tokens(stats: SourceStats, example: Any) -> None:
    if isinstance(example, dict):
        for side in ("chosen", "rejected"):
            stats.tokens += len(example[side][0])
            stats.target_tokens += sum(example[side][1])
        return
    ids, mask = example
    stats.tokens += len(ids)
    stats.target_tokens += sum(mask) - mask[0]  # a document's first token is never a target


def _line_of(location: str) -> int:
    return int(location.rsplit(":", 1)[1])


def _text_size(record: dict) -> int:
    return sum(len(v) for v in record.values() if isinstance(v, str)) or 256


def _describe(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _summary(stats: SourceStats) -> str:
    parts = [f"{stats.records} records read"]
    if stats.skipped:
        parts.append(f"{sum(stats.skipped.values())} skipped as bad")
    if stats.no_target:
        parts.append(f"{stats.no_target} with no target token left after truncation")
    return ", ".join(parts)
