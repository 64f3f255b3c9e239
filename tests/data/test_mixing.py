"""Weighted mixing, deterministic order, exact resume, and data-parallel shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

import panda.data as data
from panda.data.mixing import MixingOrder
from tests.data.conftest import make_recipe


def test_proportions_follow_the_weights_over_10k_samples():
    order = MixingOrder([400, 3000, 6600], [1.0, 2.0, 7.0], seed=3)
    sources, rows = order.epoch(0)
    assert len(sources) == 10_000
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert np.abs(shares - [0.1, 0.2, 0.7]).max() <= 0.02
    # the first 1000 samples are already mixed, not one source after another
    early = np.bincount(sources[:1000], minlength=3) / 1000
    assert np.abs(early - [0.1, 0.2, 0.7]).max() <= 0.05
    # each source's rows are valid, and a source smaller than its share repeats evenly
    for source, size in enumerate([400, 3000, 6600]):
        picked = rows[sources == source]
        assert picked.min() >= 0 and picked.max() < size
    counts = np.bincount(rows[sources == 0], minlength=400)
    assert counts.min() >= 2 and counts.max() <= 3  # 1000 samples of 400 rows: 2-3 each


def test_one_source_is_every_row_once_per_epoch():
    order = MixingOrder([50], [1.0], seed=0)
    for epoch in range(3):
        sources, rows = order.epoch(epoch)
        assert sorted(rows.tolist()) == list(range(50)) and set(sources.tolist()) == {0}
    assert order.epoch(0)[1].tolist() != order.epoch(1)[1].tolist()  # reshuffled each epoch


def test_same_seed_same_order_other_seed_other_order():
    first = MixingOrder([100, 200], [1, 1], seed=42).epoch(1)
    again = MixingOrder([100, 200], [1, 1], seed=42).epoch(1)
    other = MixingOrder([100, 200], [1, 1], seed=43).epoch(1)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[1] == other[1]).all()


@pytest.fixture
def three_sources(tmp_path, tokenizer):
    """Sources of 30, 7 and 50 one-line documents; each text says where it comes from."""
    sources = []
    for number, size in enumerate([30, 7, 50]):
        path = tmp_path / f"source{number}.jsonl"
        path.write_text("".join(json.dumps({"content": f"s{number} r{row}"}) + "\n"
                                for row in range(size)))
        sources.append({"name": "pretrain", "path": str(path), "weight": [1.0, 1.0, 2.0][number]})
    recipe = make_recipe(sources, method="pretrain", max_seq_length=32, packing=False)
    return data.prepare(recipe, tokenizer), tokenizer


def names(batch, tokenizer) -> list[str]:
    """Which documents a batch holds ("s1 r3"), padding rows left out."""
    out = []
    for ids, source in zip(batch["input_ids"].tolist(), batch["_source"].tolist()):
        if source >= 0:
            out.append(tokenizer.decode(ids).split("</s>")[0])
    return out


def test_resume_in_the_middle_yields_exactly_the_remaining_batches(three_sources):
    prepared, tokenizer = three_sources
    straight = data.TrainBatches(prepared, batch_size=4, seed=7)
    expected = [names(b, tokenizer) for _ in range(2) for b in straight]  # two epochs

    interrupted = data.TrainBatches(prepared, batch_size=4, seed=7)
    seen = []
    for batch in interrupted:
        seen.append(names(batch, tokenizer))
        if len(seen) == 9:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    resumed = data.TrainBatches(prepared, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    seen += [names(b, tokenizer) for b in resumed]  # the rest of epoch 0
    seen += [names(b, tokenizer) for b in resumed]  # epoch 1
    assert seen == expected
    assert resumed.epoch == 2


def test_epochs_differ_and_an_explicit_epoch_restarts_it(three_sources):
    prepared, tokenizer = three_sources
    batches = data.TrainBatches(prepared, batch_size=5, seed=1)
    epoch0 = [names(b, tokenizer) for b in batches]
    epoch1 = [names(b, tokenizer) for b in batches]
    assert len(epoch0) == len(epoch1) == batches.batches_per_epoch == len(batches) == 18
    assert epoch0 != epoch1
    batches.epoch = 0
    assert [names(b, tokenizer) for b in batches] == epoch0


def test_mixing_through_train_batches(three_sources):
    prepared, tokenizer = three_sources
    batches = data.TrainBatches(prepared, batch_size=8, seed=0)
    sources = np.concatenate([b["_source"].numpy() for b in batches])
    # 87 samples per epoch, weights 1:1:2 -> 21.75 : 21.75 : 43.5 -> 22, 22, 43 (largest remainders)
    assert sorted(np.bincount(sources).tolist()) == [22, 22, 43]


@pytest.mark.parametrize("world_size, batch_size", [(3, 4), (2, 5), (4, 1)])
def test_data_parallel_shards_are_disjoint_and_complete(three_sources, world_size, batch_size):
    prepared, tokenizer = three_sources
    single = data.TrainBatches(prepared, batch_size=batch_size * world_size, seed=5)
    everything = [name for batch in single for name in names(batch, tokenizer)]
    ranks = [data.TrainBatches(prepared, batch_size=batch_size, rank=rank,
                               world_size=world_size, seed=5) for rank in range(world_size)]
    per_rank = [[names(b, tokenizer) for b in r] for r in ranks]
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of batches
    assert len(per_rank[0]) == ranks[0].batches_per_epoch
    step_by_step = []
    for step in zip(*per_rank):
        assert all(len(batch) <= batch_size for batch in step)
        step_by_step += [name for batch in step for name in batch]
    assert step_by_step == everything  # disjoint and complete, in the global order
    assert len(everything) == 87


def test_a_rank_without_samples_gets_a_padding_row(three_sources):
    prepared, _ = three_sources
    # 87 samples on 9 ranks of batch 1: 10 steps are 90 slots, 3 of them empty
    ranks = [data.TrainBatches(prepared, batch_size=1, rank=r, world_size=9, seed=0)
             for r in range(9)]
    last_steps = [list(r)[-1] for r in ranks]
    empty = [b for b in last_steps if int(b["_source"][0]) == -1]
    assert len(empty) == 9 * 10 - 87
    for batch in empty:
        assert (batch["labels"] == -100).all() and int(batch["_num_docs"][0]) == 0


def test_eval_batches_cover_everything_once_in_a_fixed_order(three_sources):
    prepared, tokenizer = three_sources
    ranks = [list(data.EvalBatches(prepared, batch_size=4, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [name for batches in ranks for batch in batches for name in names(batch, tokenizer)]
    assert sorted(seen) == sorted(f"s{s} r{r}" for s, n in enumerate([30, 7, 50])
                                  for r in range(n))
    again = list(data.EvalBatches(prepared, batch_size=4, rank=0, world_size=2))
    assert [names(b, tokenizer) for b in again] == [names(b, tokenizer) for b in ranks[0]]


def test_a_changed_dataset_refuses_an_old_sampler_state(three_sources):
    from panda.errors import PandaError

    prepared, _ = three_sources
    batches = data.TrainBatches(prepared, batch_size=4, seed=7)
    state = {**batches.state_dict(), "samples_per_epoch": 99}
    with pytest.raises(PandaError, match="the data changed since the checkpoint"):
        batches.load_state_dict(state)


def test_a_checkpoint_after_an_epochs_last_batch_resumes_with_the_next_epoch(three_sources):
    prepared, tokenizer = three_sources
    straight = data.TrainBatches(prepared, batch_size=10, seed=2)
    first = [names(b, tokenizer) for b in straight]
    second = [names(b, tokenizer) for b in straight]
    interrupted = data.TrainBatches(prepared, batch_size=10, seed=2)
    for count, _ in enumerate(interrupted, 1):
        if count == len(first):
            break  # stopped right after the epoch's last batch, before the epoch ends
    assert interrupted.state_dict()["epoch"] == 1 and interrupted.state_dict()["position"] == 0
    resumed = data.TrainBatches(prepared, batch_size=10, seed=2)
    resumed.load_state_dict(interrupted.state_dict())
    assert resumed.epoch == 1
    assert [names(b, tokenizer) for b in resumed] == second
