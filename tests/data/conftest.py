"""Fixtures of the data-pipeline tests: a private cache, the tiny tokenizer, recipe builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "panda-cache"
    monkeypatch.setenv("PANDA_CACHE", str(cache))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return cache


@pytest.fixture(scope="session")
def tokenizer():
    from panda.models.tiny_tokenizer import load

    return load()


@pytest.fixture
def pair_method():
    """A stand-in preference method (data_format "pair"), registered in this process only."""
    from panda import registry
    from panda.plugins.api import MethodPlugin

    class PairMethod(MethodPlugin):
        """Stand-in for dpo/rm: wants chosen/rejected pairs."""
        data_format = "pair"

    registry.register("method", "pair-test", PairMethod)
    yield "pair-test"
    registry.unregister("method", "pair-test")


def make_recipe(sources: list[dict[str, Any]], *, method: str = "sft", model: dict | None = None,
                **data: Any):
    """A validated Recipe with these ``[[data.sources]]`` and ``[data]`` keys."""
    from panda.recipe import validate

    raw = {"model": model or {"preset": "tiny-llama", "dtype": "float32"},
           "method": {"name": method}, "data": {"sources": sources, **data}}
    eval_sources = data.pop("eval_sources", None)
    if eval_sources is not None:
        raw["data"]["eval_sources"] = eval_sources
    return validate(raw)


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_example(tokenizer, pieces: list[tuple[Any, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of hand-written pieces: each text tokenized on its own, -100 where untrained,
    and -100 on the first token (it starts a document)."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in pieces:
        piece_ids = tokens(tokenizer, piece) if isinstance(piece, str) else list(piece)
        ids += piece_ids
        labels += piece_ids if trained else [-100] * len(piece_ids)
    labels[0] = -100
    return ids, labels
