"""``prepare(recipe, tokenizer)``: every source tokenized (cached), split, and packed.

The result, :class:`PreparedData`, is what :class:`~panda.data.TrainBatches`
and :class:`~panda.data.EvalBatches` read. Two cached layers keep reruns
cheap: each source's token store (keyed by its files, plugin, tokenizer,
template, max_seq_length and method) and each split's packing plan (keyed by
the token store, the split, eval_fraction, seed and packing), so changing
``eval_fraction`` repacks without retokenizing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from panda import registry
from panda.data import cache
from panda.data.chat import resolve_template
from panda.data.encoding import EncodeContext
from panda.data.packing import PackPlan, pack_best_fit, packing_efficiency, padding_efficiency
from panda.data.sources import SourceStats, tokenize_source
from panda.data.store import TokenStore
from panda.errors import DataError

log = logging.getLogger(__name__)
PLAN_VERSION = 1
# Attention implementations that keep packed documents apart, and how (docs/data.md).
FLAT_LAYOUT_ATTN = {"flash_attention_2"}  # needs one [1, N] row (padding-free varlen)


@dataclass
class SourceData:
    """One source as the batches see it: its documents and this split's rows of them."""

    index: int  # position in data.sources / data.eval_sources
    label: str  # "sources[0] instruction"
    weight: float
    store: TokenStore
    plan: PackPlan
    stats: SourceStats
    documents: int  # documents of this split
    tokens: int  # tokens of this split
    efficiency: float  # packed: non-pad tokens / row slots
    padded_efficiency: float  # the same if every document were padded to max_seq_length
    from_cache: bool = False  # tokens found in the cache (not tokenized by this call)


@dataclass
class PreparedData:
    split: str
    data_format: str  # "lm" or "pair"
    max_seq_length: int
    packing: bool
    layout: str  # "rows": [B, T]; "flat": one [1, N] row per batch (flash attention)
    pad_id: int
    sources: list[SourceData] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(s.plan.num_rows for s in self.sources)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.sources)


def prepare(recipe: Any, tokenizer: Any, *, split: str = "train", data_format: str = "lm"
            ) -> PreparedData:
    """Read, validate, tokenize (cached) and pack the recipe's data for ``split``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if data_format not in ("lm", "pair"):
        raise ValueError(f"data_format must be 'lm' or 'pair', not {data_format!r}")
    data = recipe.data
    ctx = EncodeContext.create(tokenizer, max_seq_length=data.max_seq_length,
                               chat_template=resolve_template(tokenizer,
                                                              recipe.tokenizer.chat_template),
                               method=recipe.method.name)
    packing = data.packing and data_format == "lm"
    attn = getattr(recipe.model.options, "attn", "sdpa")
    prepared = PreparedData(split, data_format, data.max_seq_length, packing,
                            "flat" if packing and attn in FLAT_LAYOUT_ATTN else "rows",
                            pad_id=_pad_id(tokenizer))
    for group, holdout in _groups(data, split):
        for index, source in enumerate(getattr(data, group)):
            if split == "train" and source.weight == 0:
                continue  # a zero weight means "not used": do not even read it
            label = f"{group}[{index}] {source.name}"
            plugin = registry.get("dataset", source.name)(source.options)
            tokenized = tokenize_source(
                plugin, source.name, source.path, ctx, data_format=data_format,
                on_bad_record=data.on_bad_record, where=f"data.{group}[{index}]")
            store, stats, key = tokenized.store, tokenized.stats, tokenized.key
            _warn_about(f"data.{group}[{index}]", stats, data.max_seq_length)
            selected = _select(store, holdout, data.eval_fraction, recipe.run.seed)
            if len(selected) == 0:
                if split == "eval":
                    continue
                raise DataError(f"data.{group}[{index}]: no training documents left after "
                                f"holding out eval_fraction = {data.eval_fraction}")
            plan = _plan(store, key, selected, split, data.eval_fraction, recipe.run.seed,
                         packing, data.max_seq_length)
            lengths = store.lengths()[selected]
            prepared.sources.append(SourceData(
                index, label, source.weight, store, plan, stats, len(selected), int(lengths.sum()),
                packing_efficiency(lengths, plan, data.max_seq_length) if packing else
                padding_efficiency(lengths, data.max_seq_length),
                padding_efficiency(lengths, data.max_seq_length), tokenized.from_cache))
    if split == "train" and not prepared.sources:
        raise DataError("data.sources: no source with a positive weight has data")
    return prepared


def _warn_about(where: str, stats: SourceStats, max_seq_length: int) -> None:
    """Say what was cut or left out, on every run (the counts come from the cache too)."""
    problems = []
    if stats.truncated:
        problems.append(f"{stats.truncated} example(s) truncated to {max_seq_length} tokens")
    if stats.no_target:
        problems.append(f"{stats.no_target} dropped with no trained token left")
    if stats.skipped:
        problems.append(f"{sum(stats.skipped.values())} bad record(s) skipped in "
                        f"{len(stats.skipped)} file(s)")
    if problems:
        log.warning("%s: %s (panda data prepare shows details)", where, "; ".join(problems))


def _groups(data: Any, split: str) -> list[tuple[str, str]]:
    """(recipe list, which part of its documents) that make up ``split``."""
    if split == "train":
        return [("sources", "train")]
    groups = [("eval_sources", "all")] if data.eval_sources else []
    if data.eval_fraction > 0:
        groups.append(("sources", "eval"))
    return groups


def _select(store: TokenStore, part: str, fraction: float, seed: int) -> np.ndarray:
    """Documents of ``part`` ("all", or the "train"/"eval" side of the eval_fraction split).

    The split is by record (all pieces of a split document stay together) and
    stable: a record is held out when its seeded hash ranks among the lowest
    ``round(fraction * records)``, so adding records elsewhere moves few others.
    """
    documents = np.arange(len(store), dtype=np.int64)
    if part == "all" or fraction <= 0:
        return documents
    record_keys = (store.file.astype(np.uint64) << np.uint64(32)) | store.line.astype(np.uint64)
    records, record_of_doc = np.unique(record_keys, return_inverse=True)
    held_out = min(len(records) - 1, max(1, round(fraction * len(records))))
    held_out_records = np.argsort(_mix64(records ^ np.uint64(seed)), kind="stable")[:held_out]
    is_eval = np.zeros(len(records), dtype=bool)
    is_eval[held_out_records] = True
    return documents[is_eval[record_of_doc] == (part == "eval")]


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fixed, platform-independent 64-bit hash."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _plan(store: TokenStore, tokens_key: str, selected: np.ndarray, split: str, fraction: float,
          seed: int, packing: bool, max_seq_length: int) -> PackPlan:
    key = cache.fingerprint("plan", PLAN_VERSION, tokens_key, split, fraction, seed, packing,
                            max_seq_length)
    folder = cache.cache_root() / "plans" / key

    def build(tmp: Path) -> None:
        if packing:
            plan = pack_best_fit(store.lengths()[selected], max_seq_length, selected)
        else:
            plan = PackPlan.one_per_row(selected)
        np.save(tmp / "docs.npy", plan.docs)
        np.save(tmp / "starts.npy", plan.starts)

    with np.errstate(over="ignore"):
        cache.build_or_wait(folder, build, what="the packing plan")
    return PackPlan(np.load(folder / "docs.npy", mmap_mode="r"),
                    np.load(folder / "starts.npy", mmap_mode="r"))


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def load_tokenizer(recipe: Any) -> Any:
    """The recipe's tokenizer: ``tokenizer.path``, else the model plugin's, else ``model.path``."""
    from panda.errors import PandaError

    path = recipe.tokenizer.path
    if path is None:
        plugin = registry.get("model", recipe.model.name)(recipe.model.options)
        try:
            return plugin.tokenizer(recipe)
        except NotImplementedError:
            pass
        path = getattr(recipe.model.options, "path", None)
        preset = getattr(recipe.model.options, "preset", None) or ""
        if path is None and preset.startswith("tiny"):
            from panda.models import tiny_tokenizer

            return tiny_tokenizer.load()
        if path is None:
            raise PandaError("no tokenizer: set tokenizer.path (a preset model has no tokenizer "
                             "of its own)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=bool(
            getattr(recipe.model.options, "trust_remote_code", False)))
    except OSError as exc:
        raise PandaError(f"cannot load the tokenizer from {path}: {exc}") from None
