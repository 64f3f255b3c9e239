"""The tokenization cache: hits, misses, its format, and ranks that wait for it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import panda.data as data
from panda.plugins.datasets.instruction import Instruction
from tests.data.conftest import FIXTURES, make_recipe


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text((FIXTURES / "instruction.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture
def count_renders(monkeypatch):
    calls = []
    original = Instruction.segments

    def counting(self, record, ctx):
        calls.append(record)
        return original(self, record, ctx)

    monkeypatch.setattr(Instruction, "segments", counting)
    return calls


def prepared_with(tokenizer, path, **data_keys):
    recipe = make_recipe([{"name": "instruction", "path": str(path)}],
                         **{"max_seq_length": 64, **data_keys})
    return data.prepare(recipe, tokenizer)


def test_a_rerun_hits_the_cache(tokenizer, source, count_renders):
    first = prepared_with(tokenizer, source)
    assert not first.sources[0].from_cache and len(count_renders) == 3
    second = prepared_with(tokenizer, source)
    assert second.sources[0].from_cache and len(count_renders) == 3  # nothing re-rendered
    assert second.sources[0].plan.docs.tolist() == first.sources[0].plan.docs.tolist()


@pytest.mark.parametrize("change", ["content", "max_seq_length", "template", "method"])
def test_a_changed_input_misses_the_cache(tokenizer, source, count_renders, change):
    prepared_with(tokenizer, source)
    keys: dict = {}
    if change == "content":
        time.sleep(0.01)  # a distinct modification time even on coarse file systems
        source.write_text(source.read_text(encoding="utf-8") + '{"input": "x", "target": "y"}\n',
                          encoding="utf-8")
    elif change == "max_seq_length":
        keys["max_seq_length"] = 32
    prepared = None
    if change in ("template", "method"):
        from panda.recipe import validate

        recipe = validate({"model": {"preset": "tiny-llama"},
                           "method": {"name": "pretrain" if change == "method" else "sft"},
                           "tokenizer": {"chat_template": "chatml"} if change == "template" else {},
                           "data": {"max_seq_length": 64, "sources": [
                               {"name": "instruction", "path": str(source)}]}})
        prepared = data.prepare(recipe, tokenizer)
    else:
        prepared = prepared_with(tokenizer, source, **keys)
    assert not prepared.sources[0].from_cache
    assert len(count_renders) > 3


def test_eval_fraction_repacks_without_retokenizing(tokenizer, source, count_renders):
    prepared_with(tokenizer, source)
    train = prepared_with(tokenizer, source, eval_fraction=0.34)
    held_out = data.prepare(make_recipe([{"name": "instruction", "path": str(source)}],
                                        max_seq_length=64, eval_fraction=0.34),
                            tokenizer, split="eval")
    assert len(count_renders) == 3 and train.sources[0].from_cache
    assert (train.sources[0].documents, held_out.sources[0].documents) == (2, 1)
    together = set(train.sources[0].plan.docs.tolist()) | set(held_out.sources[0].plan.docs.tolist())
    assert together == {0, 1, 2}


def test_the_cache_is_arrow_that_datasets_can_open(tokenizer, source, private_cache):
    from datasets import Dataset

    prepared = prepared_with(tokenizer, source)
    store = prepared.sources[0].store
    opened = Dataset.from_file(store.path)
    assert opened.column_names == ["input_ids", "loss_mask", "file", "line"]
    assert opened[1]["input_ids"] == store.document(1)[0].tolist()
    assert opened["line"] == [1, 2, 3]
    assert store.path.startswith(str(private_cache))


WAITER = textwrap.dedent("""
    import sys
    from panda.models.tiny_tokenizer import load
    from panda.recipe import validate
    import panda.data as data
    recipe = validate({"model": {"preset": "tiny-llama"}, "data": {"max_seq_length": 64,
                      "sources": [{"name": "instruction", "path": sys.argv[1]}]}})
    try:
        prepared = data.prepare(recipe, load())
        print("rows", prepared.num_rows, "cached", prepared.sources[0].from_cache)
    except Exception as exc:
        print("error", exc)
""")


def start_waiter(path):
    """A second rank (LOCAL_RANK=1): it must wait for the files, not build them."""
    env = {**os.environ, "LOCAL_RANK": "1", "PANDA_DATA_WAIT_S": "60"}
    return subprocess.Popen([sys.executable, "-c", WAITER, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_other_ranks_wait_for_the_first_to_build(tokenizer, source):
    waiter = start_waiter(source)
    time.sleep(3)  # the waiter is polling by now: nothing exists yet
    assert waiter.poll() is None
    built = prepared_with(tokenizer, source)
    assert not built.sources[0].from_cache  # this process (the builder) tokenized it
    out, err = waiter.communicate(timeout=60)
    assert out.strip() == f"rows {built.num_rows} cached True", err  # the waiter did not


def test_other_ranks_stop_with_the_builders_error(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a"}\n')
    waiter = start_waiter(bad)
    time.sleep(3)
    with pytest.raises(Exception, match="missing field 'target'"):
        prepared_with(tokenizer, bad)
    out, err = waiter.communicate(timeout=60)
    assert out.startswith(f"error {bad}:1: missing field 'target'"), err
