"""What ``panda data prepare`` and ``panda data inspect`` print, as lines of text."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterator

from panda import registry

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


def _load(recipe_path: str, overrides: tuple[str, ...]) -> tuple[Any, Any, str]:
    from panda.data.prepared import load_tokenizer
    from panda.recipe import load

    recipe = load(recipe_path, overrides)
    method = registry.get("method", recipe.method.name)
    return recipe, load_tokenizer(recipe), getattr(method, "data_format", "lm")


def _log_to_stderr() -> None:
    logger = logging.getLogger("panda.data")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def prepare_report(recipe_path: str, overrides: tuple[str, ...] = ()) -> Iterator[str]:
    """Prepare every split the recipe uses and describe each source."""
    from panda.data.cache import cache_root
    from panda.data.prepared import prepare

    _log_to_stderr()
    recipe, tokenizer, data_format = _load(recipe_path, overrides)
    splits = ["train"]
    if recipe.data.eval_sources or recipe.data.eval_fraction > 0:
        splits.append("eval")
    for split in splits:
        started = time.perf_counter()
        prepared = prepare(recipe, tokenizer, split=split, data_format=data_format)
        seconds = time.perf_counter() - started
        yield (f"{split} split ({prepared.data_format} data, max_seq_length "
               f"{prepared.max_seq_length}, packing {'on' if prepared.packing else 'off'})")
        yield from _describe_prepared(prepared, split)
        yield (f"  total: {prepared.num_rows} rows, {prepared.num_tokens} tokens, "
               f"prepared in {seconds:.2f} s")
    yield f"cache: {cache_root()}"


def _describe_prepared(prepared: Any, split: str) -> Iterator[str]:
    for source in prepared.sources:
        stats = source.stats
        yield f"  data.{source.label}: {stats.files} file(s), weight {source.weight:g}" + (
            ", from the cache" if source.from_cache else ", tokenized now")
        yield (f"    records {stats.records}, documents {source.documents} in this split "
               f"({stats.documents} in all), tokens {source.tokens}")
        yield (f"    truncated {stats.truncated}, split {stats.split}, dropped without a "
               f"target token {stats.no_target}, bad records skipped "
               f"{sum(stats.skipped.values())}")
        for file, count in stats.skipped.items():
            yield f"    skipped {count} bad record(s) in {file}"
        for example in stats.first_skipped:
            yield f"      e.g. {example}"
        unit = "pairs" if prepared.data_format == "pair" else "rows"
        if prepared.packing:
            yield (f"    {source.plan.num_rows} {unit} of {prepared.max_seq_length} tokens: "
                   f"packing efficiency {source.efficiency:.1%} (padding every document to "
                   f"max_seq_length: {source.padded_efficiency:.1%})")
        else:
            yield (f"    {source.plan.num_rows} {unit}, not packed: padding to max_seq_length "
                   f"would fill {source.padded_efficiency:.1%} of slots")
        if stats.truncated or stats.no_target:
            yield (f"    warning: {stats.truncated} example(s) truncated to max_seq_length, "
                   f"{stats.no_target} dropped because no trained token was left")


def inspect_rows(recipe_path: str, overrides: tuple[str, ...] = (), *, count: int = 3,
                 split: str = "train", color: bool = False) -> Iterator[str]:
    """The first ``count`` rows of the split's order, decoded, trained tokens marked."""
    from panda.data.batches import EvalBatches, TrainBatches
    from panda.data.prepared import prepare

    recipe, tokenizer, data_format = _load(recipe_path, overrides)
    prepared = prepare(recipe, tokenizer, split=split, data_format=data_format)
    if split == "train":
        batches = TrainBatches(prepared, batch_size=1, seed=recipe.run.seed)
        order = zip(*batches.order.epoch(0))
    else:
        batches = EvalBatches(prepared, batch_size=1)
        order = zip(batches.sources, batches.rows)
    legend = ("trained tokens in green, the rest dim" if color else
              "[[text]] = tokens that carry loss; the rest has label -100")
    yield f"{split} split, {prepared.num_rows} rows; {legend}"
    for shown, (source, row) in enumerate(order):
        if shown >= count:
            break
        data = prepared.sources[int(source)]
        docs = data.plan.row(int(row))
        yield ""
        yield _bold(f"row {shown} (data.{data.label}, row {int(row)}, {len(docs)} document(s))",
                    color)
        for doc in docs:
            sides = ("chosen_", "rejected_") if prepared.data_format == "pair" else ("",)
            where = f"{_file(data, int(doc))}:{int(data.store.line[int(doc)])}"
            for side in sides:
                ids, mask = data.store.document(int(doc), side)
                name = f" {side[:-1]}" if side else ""
                yield _bold(f"--- document{name} from {where}, {len(ids)} tokens", color)
                yield _marked(tokenizer, ids.tolist(), mask.tolist(), color)


def _file(data: Any, doc: int) -> str:
    from panda.data import cache

    files = cache.read_json(_stats_path(data)).get("files_list", [])
    index = int(data.store.file[doc])
    return files[index] if index < len(files) else f"file {index}"


def _stats_path(data: Any):
    from pathlib import Path

    return Path(data.store.path).with_name("stats.json")


def _marked(tokenizer: Any, ids: list[int], mask: list[int], color: bool) -> str:
    """The document's text; runs of trained tokens marked. The first token never trains."""
    mask = [0] + mask[1:]
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            if color:
                out.append(f"{GREEN if mask[start] else DIM}{text}{RESET}")
            else:
                out.append(f"[[{text}]]" if mask[start] else text)
            start = end
    return "".join(out)


def _bold(text: str, color: bool) -> str:
    return f"{BOLD}{text}{RESET}" if color else text
