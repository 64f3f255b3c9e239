"""Pair data as the preference methods see it: only reply tokens carry loss (never the prompt,
system or history), truncation cuts the prompt before the reply and is counted, and a pair is
never split across micro-batches or ranks."""

from __future__ import annotations

import logging

import pytest

import panda.data as data
from align_helpers import FIXTURES
from panda.data.encoding import FitCounts, fit_pair
from panda.recipe import validate

SYSTEM_AND_HISTORY = [{"role": "system", "content": "Be exact."},
                      {"role": "user", "content": "1 + 1?"},
                      {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "2 + 2?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from panda.models.tiny_tokenizer import load

    return load()


def pair_recipe(path=FIXTURES / "pairs.jsonl", max_seq_length=64, method="dpo"):
    return validate({"model": {"preset": "tiny-llama", "dtype": "float32"},
                     "method": {"name": method},
                     "data": {"max_seq_length": max_seq_length,
                              "sources": [{"name": "preference", "path": str(path)}]}})


def all_pairs(tokenizer, recipe):
    prepared = data.prepare(recipe, tokenizer, split="train", data_format="pair")
    return prepared, next(iter(data.EvalBatches(prepared, batch_size=prepared.num_rows)))


def test_only_reply_tokens_carry_loss_never_prompt_system_or_history(tokenizer):
    _, batch = all_pairs(tokenizer, pair_recipe())
    prompt = tokenizer.apply_chat_template(SYSTEM_AND_HISTORY, add_generation_prompt=True,
                                           tokenize=False)
    found = 0
    for side, reply in (("chosen", "4"), ("rejected", "5")):
        for ids, labels, mask in zip(batch[f"{side}_input_ids"], batch[f"{side}_labels"],
                                     batch[f"{side}_attention_mask"]):
            if not tokenizer.decode(ids[mask.bool()]).startswith("<|system|>\nBe exact.</s>\n"
                                                                 "<|user|>\n1 + 1?"):
                continue
            found += 1
            trained = (labels != -100).nonzero().flatten()
            first = int(trained[0])
            # every token before the reply is prompt (system, history question and answer,
            # question, assistant header) and carries no label; every one after does
            assert tokenizer.decode(ids[:first]) == prompt
            assert trained.tolist() == list(range(first, int(mask.sum())))
            assert tokenizer.decode(ids[trained]) == f"{reply}</s>\n"  # reply + end of turn
            assert (labels[trained] == ids[trained]).all()
    assert found == 2


def test_padding_carries_no_loss_and_both_sides_share_one_length(tokenizer):
    _, batch = all_pairs(tokenizer, pair_recipe())
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    for side in ("chosen", "rejected"):
        padding = batch[f"{side}_attention_mask"] == 0
        assert (batch[f"{side}_labels"][padding] == -100).all()


def fitted(prompt_len, chosen_len, rejected_len, max_len):
    example = {"prompt": (list(range(100, 100 + prompt_len)), [0] * prompt_len),
               "chosen": (list(range(200, 200 + chosen_len)), [1] * chosen_len),
               "rejected": (list(range(300, 300 + rejected_len)), [1] * rejected_len)}
    counts = FitCounts()
    return fit_pair(example, max_len, counts), counts


def test_truncation_cuts_the_prompt_first_and_keeps_the_whole_reply_when_it_can():
    result, counts = fitted(prompt_len=50, chosen_len=20, rejected_len=10, max_len=64)
    prompt, _ = result["prompt"]
    assert prompt == list(range(106, 150))  # the end of the prompt, nearest the reply
    assert result["chosen"][0] == list(range(200, 220))  # replies whole
    assert result["rejected"][0] == list(range(300, 310))
    assert counts.truncated == 1 and counts.no_target == 0


def test_truncation_keeps_half_the_budget_for_the_prompt_then_cuts_the_reply():
    result, counts = fitted(prompt_len=50, chosen_len=60, rejected_len=5, max_len=64)
    assert result["prompt"][0] == list(range(118, 150))  # half of 64
    assert result["chosen"][0] == list(range(200, 232))  # the rest of the budget
    assert result["rejected"][0] == list(range(300, 305))
    result, _ = fitted(prompt_len=10, chosen_len=80, rejected_len=5, max_len=64)
    assert len(result["prompt"][0]) == 10 and len(result["chosen"][0]) == 54


def test_a_fitting_pair_is_left_alone():
    result, counts = fitted(prompt_len=30, chosen_len=34, rejected_len=3, max_len=64)
    assert len(result["prompt"][0]) == 30 and counts.truncated == 0


def test_truncated_pairs_are_counted_and_warned_about_on_every_run(tokenizer, caplog):
    recipe = pair_recipe(max_seq_length=48)
    for _ in range(2):  # the second run reads the cache and still warns
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="panda.data.prepared"):
            prepared, batch = all_pairs(tokenizer, recipe)
        truncated = prepared.sources[0].stats.truncated
        assert truncated >= 1
        assert any(f"{truncated} example(s) truncated to 48 tokens" in m for m in caplog.messages)
        for side in ("chosen", "rejected"):
            assert batch[f"{side}_input_ids"].shape[1] <= 48
            assert ((batch[f"{side}_labels"] != -100).sum(dim=1) > 0).all()


@pytest.mark.parametrize("batch_size,world_size", [(1, 1), (3, 1), (2, 2), (1, 3), (5, 2)])
def test_a_pair_is_never_split_across_micro_batches_or_ranks(tokenizer, batch_size, world_size):
    prepared = data.prepare(pair_recipe(), tokenizer, split="train", data_format="pair")
    seen = []
    per_rank = [data.TrainBatches(prepared, batch_size=batch_size, rank=rank,
                                  world_size=world_size, seed=1) for rank in range(world_size)]
    for batches in zip(*per_rank):
        for batch in batches:
            real = int(batch["_num_pairs"])
            store = prepared.sources[0].store
            for index in range(real):
                row = int(batch["_row"][index])
                doc = int(prepared.sources[0].plan.row(row)[0])
                # both sides of row `index` are the two replies of the same record
                for side in ("chosen", "rejected"):
                    ids, _ = store.document(doc, f"{side}_")
                    assert batch[f"{side}_input_ids"][index, :len(ids)].tolist() == ids.tolist()
                seen.append(row)
    assert sorted(seen) == list(range(prepared.num_rows))  # each pair exactly once per epoch
