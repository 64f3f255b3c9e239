"""Best-fit-decreasing packing, and packed rows that keep documents apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import panda.data as data
from panda.data.packing import pack_best_fit, packing_efficiency, padding_efficiency
from tests.data.conftest import make_recipe


def check_plan(plan, lengths, capacity):
    assert sorted(plan.docs.tolist()) == list(range(len(lengths)))  # each document exactly once
    for row in range(plan.num_rows):
        assert lengths[plan.row(row)].sum() <= capacity


def test_best_fit_on_a_long_tailed_distribution():
    """Acceptance: >= 98% of the slots hold tokens, versus padding every document to the max."""
    rng = np.random.default_rng(0)
    capacity = 2048
    # Instruction/chat-like lengths: a lognormal body (median ~300 tokens) with a long tail.
    lengths = np.clip(rng.lognormal(5.7, 0.9, 20000).astype(np.int64), 8, capacity)
    plan = pack_best_fit(lengths, capacity)
    check_plan(plan, lengths, capacity)
    packed = packing_efficiency(lengths, plan, capacity)
    padded = padding_efficiency(lengths, capacity)
    print(f"\npacking efficiency {packed:.4f} vs padding to max_seq_length {padded:.4f}")
    assert packed >= 0.98
    assert padded < 0.3


def test_best_fit_is_tight_and_deterministic():
    lengths = np.array([5, 3, 7, 2, 8, 1, 4, 10])
    plan = pack_best_fit(lengths, 10)
    check_plan(plan, lengths, 10)
    assert plan.num_rows == 4  # 40 tokens in rows of 10: no slot wasted
    again = pack_best_fit(lengths, 10)
    assert plan.docs.tolist() == again.docs.tolist() and plan.starts.tolist() == again.starts.tolist()
    with pytest.raises(ValueError):
        pack_best_fit(np.array([11]), 10)


@pytest.fixture
def packed_corpus(tmp_path, tokenizer):
    """Eight pre-training documents of varied lengths, packed into rows of 64 tokens."""
    words = "大熊猫 panda trains models 我们 用 中文 and English text".split()
    rng = np.random.default_rng(1)
    path = tmp_path / "docs.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for number in range(8):
            content = " ".join(rng.choice(words, size=int(rng.integers(3, 16))))
            out.write(json.dumps({"title": f"doc {number}", "content": content},
                                 ensure_ascii=False) + "\n")
    recipe = make_recipe([{"name": "pretrain", "path": str(path)}], method="pretrain",
                         max_seq_length=64)
    return data.prepare(recipe, tokenizer)


def test_packed_rows_restart_positions_and_never_label_across_documents(packed_corpus):
    prepared = packed_corpus
    assert prepared.num_rows < 8  # several documents share rows
    store = prepared.sources[0].store
    for batch in data.EvalBatches(prepared, batch_size=2):
        for row in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            positions = batch["position_ids"][row]
            starts = (positions == 0).nonzero().flatten().tolist()
            assert len(starts) == int(batch["_num_docs"][row])
            assert (labels[starts] == -100).all()  # no label predicts a document's first token
            ends = starts[1:] + [int(len(ids))]
            for start, end in zip(starts, ends):
                # each document's positions run 0, 1, 2, ... (padding continues the last one)
                assert positions[start:end].tolist() == list(range(end - start))
    lengths = store.lengths()
    assert prepared.num_tokens == int(lengths.sum())


def tiny_llama(attn: str, dtype=torch.float32, device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.presets import PRESETS

    shape = dict(PRESETS["tiny-llama"])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                            dtype=dtype).to(device).eval()


def assert_documents_isolated(model, prepared, atol: float = 1e-5):
    """Logits of every packed document equal its logits alone (atol 1e-5, fp32).

    "Alone" runs each document as its own row, right-padded: causal attention
    never lets a token see the padding after it, and one forward pass for all
    documents keeps flex_attention from compiling once per length.
    """
    source = prepared.sources[0]
    docs = [source.store.document(d)[0] for d in range(len(source.store))]
    longest = max(len(d) for d in docs)
    alone_ids = torch.zeros(len(docs), longest, dtype=torch.long)
    for index, ids in enumerate(docs):
        alone_ids[index, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
    device = next(model.parameters()).device
    with torch.no_grad():
        alone = model(input_ids=alone_ids.to(device), use_cache=False).logits.cpu()
    rows = iter(range(source.plan.num_rows))
    checked = 0
    for batch in data.EvalBatches(prepared, batch_size=16):  # all rows at once
        inputs = {k: v.to(device) if torch.is_tensor(v) else v
                  for k, v in data.model_inputs(batch).items()}
        with torch.no_grad():
            packed = model(**inputs).logits.cpu()
        flat = prepared.layout == "flat"
        start = 0  # in the flat layout all rows sit back to back in batch row 0
        for batch_row in range(len(batch["_num_docs"]) if not flat else 16):
            row = next(rows, None)
            if row is None:
                break
            at = 0 if flat else batch_row
            start = start if flat else 0
            for doc in source.plan.row(row):
                n = len(docs[doc])
                assert batch["input_ids"][at, start:start + n].tolist() == docs[doc].tolist()
                torch.testing.assert_close(packed[at, start:start + n], alone[doc, :n],
                                           atol=atol, rtol=0)
                start += n
                checked += 1
    assert checked == source.documents > source.plan.num_rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(packed_corpus, attn):
    assert_documents_isolated(tiny_llama(attn), packed_corpus)


def test_flat_layout_keeps_documents_apart(packed_corpus):
    """The [1, N] layout used for flash_attention_2, checked through SDPA's packed path."""
    packed_corpus.layout = "flat"
    batch = next(iter(data.EvalBatches(packed_corpus, batch_size=4)))
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] % 8 == 0
    assert_documents_isolated(tiny_llama("sdpa"), packed_corpus)


@pytest.mark.slow
def test_flex_attention_keeps_documents_apart(packed_corpus):
    assert_documents_isolated(tiny_llama("flex_attention"), packed_corpus)


@pytest.mark.gpu
def test_flash_attention_keeps_documents_apart_in_the_flat_layout(packed_corpus):
    """flash_attention_2 needs a GPU and the flash-attn package; bf16, so a looser atol."""
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    packed_corpus.layout = "flat"  # what prepare() chooses for flash_attention_2
    model = tiny_llama("flash_attention_2", dtype=torch.bfloat16, device="cuda")
    assert_documents_isolated(model, packed_corpus, atol=1e-2)


def test_prepare_picks_the_flat_layout_for_flash_attention(tokenizer):
    from tests.data.conftest import FIXTURES

    for attn, layout in (("sdpa", "rows"), ("flash_attention_2", "flat")):
        recipe = make_recipe([{"name": "instruction", "path": str(FIXTURES / "instruction.jsonl")}],
                             model={"preset": "tiny-llama", "attn": attn})
        assert data.prepare(recipe, tokenizer).layout == layout


def test_model_inputs_turn_the_kv_cache_off():
    batch = {"input_ids": torch.ones(1, 8), "labels": torch.ones(1, 8),
             "position_ids": torch.zeros(1, 8), "_num_docs": torch.ones(1)}
    assert set(data.model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert data.model_inputs(batch)["use_cache"] is False


def test_validation_refuses_packing_it_cannot_keep_apart():
    from panda.errors import RecipeError
    from tests.data.conftest import FIXTURES

    source = [{"name": "instruction", "path": str(FIXTURES / "instruction.jsonl")}]
    remote = {"preset": "tiny-llama", "trust_remote_code": True}
    with pytest.raises(RecipeError, match="packing with a model's own remote code"):
        make_recipe(source, model=remote)
    assert not make_recipe(source, model=remote, packing=False).data.packing
    for attn in data.PACKING_ATTENTION:
        make_recipe(source, model={"preset": "tiny-llama", "attn": attn})
