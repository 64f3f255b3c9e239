"""Each record format: what gets tokenized, and which tokens carry loss, token by token."""

from __future__ import annotations

import pytest

import panda.data as data
from tests.data.conftest import FIXTURES, expected_example, make_recipe

EOS, PAD = 2, 0


def rows_of(tokenizer, name: str, path, *, method: str = "sft", max_seq_length: int = 256,
            **options) -> list[tuple[list[int], list[int]]]:
    """Every document of a source as (ids, labels), unpacked, in file order."""
    recipe = make_recipe([{"name": name, "path": str(path), **options}], method=method,
                         max_seq_length=max_seq_length, packing=False)
    prepared = data.prepare(recipe, tokenizer)
    batch = next(iter(data.EvalBatches(prepared, batch_size=64)))
    out = []
    order = prepared.sources[0].plan.docs
    for row in sorted(range(len(order)), key=lambda r: order[r]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        n = len(ids)
        while n and labels[n - 1] == -100 and ids[n - 1] == PAD:
            n -= 1  # drop padding (pads carry -100 and the pad id)
        out.append((ids[:n], labels[:n]))
        assert all(label == -100 for label in labels[n:]), "padding carries no loss"
    return out


def test_instruction_masks_the_input_and_keeps_chinese(tokenizer):
    rows = rows_of(tokenizer, "instruction", FIXTURES / "instruction.jsonl")
    assert len(rows) == 3
    expected = expected_example(tokenizer, [
        ("请把下面的句子翻译成英文：我喜欢学习机器学习。 答：", False),
        ("I like studying machine learning.", True), ([EOS], True)])
    assert rows[1] == expected
    assert tokenizer.decode(rows[1][0]).startswith("请把下面的句子翻译成英文：我喜欢学习机器学习。")


def test_pretrain_trains_title_and_content(tokenizer):
    rows = rows_of(tokenizer, "pretrain", FIXTURES / "pretrain.json", method="pretrain")
    assert rows[0] == expected_example(tokenizer, [("大熊猫\n大熊猫是中国的国宝。我们用中文和英文训练语言模型。",
                                                    True), ([EOS], True)])
    # a record without a title is its content alone
    assert tokenizer.decode(rows[2][0]) == ("A record without a title is one document of "
                                            "content alone.</s>")


def test_text_per_file_and_per_paragraph(tokenizer):
    per_file = rows_of(tokenizer, "text", FIXTURES / "text", method="pretrain")
    assert [tokenizer.decode(ids) for ids, _ in per_file] == [
        "The quick brown fox jumps over the lazy dog.\nIt keeps jumping.\n\n"
        "今天天气很好，我们去公园散步吧。\n</s>",
        "Large language models learn to predict the next token.\n</s>"]
    per_block = rows_of(tokenizer, "text", FIXTURES / "text" / "a.txt", method="pretrain",
                        document="paragraph")
    assert [tokenizer.decode(ids) for ids, _ in per_block] == [
        "The quick brown fox jumps over the lazy dog.\nIt keeps jumping.</s>",
        "今天天气很好，我们去公园散步吧。</s>"]
    assert all(labels[1:] == ids[1:] for ids, labels in per_block)


def test_alpaca_trains_outputs_only(tokenizer):
    rows = rows_of(tokenizer, "alpaca", FIXTURES / "alpaca.json")
    assert rows[0] == expected_example(tokenizer, [
        ("<|user|>\nAdd the two numbers.\n3 + 4</s>\n<|assistant|>\n", False), ("7</s>\n", True)])
    assert rows[1] == expected_example(tokenizer, [
        ("<|system|>\nYou translate.</s>\n<|user|>\n把句子翻译成英文。\n我喜欢学习。</s>\n"
         "<|assistant|>\n", False), ("I like studying.</s>\n", True)])
    assert rows[2] == expected_example(tokenizer, [
        ("<|user|>\nSay hi.</s>\n<|assistant|>\n", False), ("hi</s>\n", True),
        ("<|user|>\nReverse the word panda.</s>\n<|assistant|>\n", False), ("adnap</s>\n", True)])


def test_sharegpt_trains_gpt_turns_only(tokenizer):
    rows = rows_of(tokenizer, "sharegpt", FIXTURES / "sharegpt.jsonl")
    assert rows[0] == expected_example(tokenizer, [
        ("<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n", False),
        ("Paris.</s>\n", True),
        ("<|user|>\n和中国呢？</s>\n<|assistant|>\n", False), ("北京。</s>\n", True)])
    assert rows[1] == expected_example(tokenizer, [
        ("<|system|>\nBe brief.</s>\n<|user|>\n2 + 2?</s>\n<|assistant|>\n", False),
        ("4</s>\n", True)])


def test_chat_uses_the_tokenizer_template(tokenizer):
    rows = rows_of(tokenizer, "chat", FIXTURES / "chat.jsonl")
    assert rows[0] == expected_example(tokenizer, [
        ("<|system|>\nYou are panda.</s>\n<|user|>\n你好</s>\n<|assistant|>\n", False),
        ("你好！有什么可以帮你？</s>\n", True)])
    assert rows[1] == expected_example(tokenizer, [
        ("<|user|>\nAdd 3 + 4.</s>\n<|assistant|>\n", False), ("7</s>\n", True),
        ("<|user|>\nTimes 2?</s>\n<|assistant|>\n", False), ("14</s>\n", True)])
    assert tokenizer.decode(rows[0][0]).count("你好") == 2


def test_chat_with_a_builtin_template_from_the_recipe(tokenizer):
    from panda.recipe import validate

    recipe = validate({"model": {"preset": "tiny-llama"},
                       "tokenizer": {"chat_template": "alpaca"},
                       "data": {"packing": False, "sources": [
                           {"name": "chat", "path": str(FIXTURES / "chat.jsonl")}]}})
    prepared = data.prepare(recipe, tokenizer)
    batch = next(iter(data.EvalBatches(prepared, batch_size=8)))
    texts = [tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
             for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert sorted(texts) == sorted(["你好！有什么可以帮你？</s>\n\n", "7</s>\n\n14</s>\n\n"])


def test_pretrain_method_trains_prompts_too(tokenizer):
    rows = rows_of(tokenizer, "instruction", FIXTURES / "instruction.jsonl", method="pretrain")
    ids, labels = rows[0]
    assert labels == [-100] + ids[1:]


def test_preference_pairs_share_the_prompt(tokenizer, pair_method):
    recipe = make_recipe([{"name": "preference", "path": str(FIXTURES / "preference.jsonl")}],
                         method=pair_method, max_seq_length=128)
    prepared = data.prepare(recipe, tokenizer, data_format="pair")
    batch = next(iter(data.EvalBatches(prepared, batch_size=8)))
    assert int(batch["_num_pairs"]) == 2
    first = prepared.sources[0].plan.docs.tolist().index(0)  # the row of the file's first pair
    prompt = "<|user|>\n大熊猫吃什么？</s>\n<|assistant|>\n"
    for side, reply in (("chosen", "主要吃竹子。</s>\n"), ("rejected", "吃肉。</s>\n")):
        ids, labels = expected_example(tokenizer, [(prompt, False), (reply, True)])
        n = len(ids)
        assert batch[f"{side}_input_ids"][first, :n].tolist() == ids
        assert batch[f"{side}_labels"][first, :n].tolist() == labels
        assert batch[f"{side}_attention_mask"][first].tolist() == [1] * n + [0] * (
            batch[f"{side}_input_ids"].shape[1] - n)
        assert (batch[f"{side}_labels"][first, n:] == -100).all()
    second = 1 - first
    ids = batch["chosen_input_ids"][second][batch["chosen_attention_mask"][second].bool()]
    assert tokenizer.decode(ids.tolist()) == (
        "<|system|>\nBe exact.</s>\n<|user|>\n1 + 1?</s>\n<|assistant|>\n2</s>\n"
        "<|user|>\n2 + 2?</s>\n<|assistant|>\n4</s>\n")
    labels = batch["chosen_labels"][second]
    assert tokenizer.decode(labels[labels != -100].tolist()) == "4</s>\n"  # history is prompt


def test_pair_format_cannot_feed_an_lm_method(tokenizer):
    from panda.errors import RecipeError

    with pytest.raises(RecipeError, match="gives preference pair data but method 'sft'"):
        make_recipe([{"name": "preference", "path": str(FIXTURES / "preference.jsonl")}])


@pytest.mark.parametrize("template", [None, "alpaca", "chatml"])
def test_fast_chat_rendering_equals_apply_chat_template(tokenizer, template):
    import json

    from panda.data.chat import ChatRenderer, resolve_template

    text = resolve_template(tokenizer, template)
    renderer = ChatRenderer(tokenizer, text)
    assert renderer._direct is not None  # transformers' compiled template is reachable
    for line in (FIXTURES / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        for end in range(1, len(messages) + 1):
            for prompt in (False, True):
                assert renderer.render(messages[:end], prompt) == tokenizer.apply_chat_template(
                    messages[:end], chat_template=text, tokenize=False,
                    add_generation_prompt=prompt)


def test_a_template_that_raises_becomes_a_bad_record(tokenizer):
    from panda.data.chat import ChatRenderer
    from panda.plugins.api import BadRecord

    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}"
              "{% endfor %}")
    renderer = ChatRenderer(tokenizer, strict)
    with pytest.raises(BadRecord, match="the chat template rejects this conversation: no system"):
        renderer.segments([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}])
