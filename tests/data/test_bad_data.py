"""Bad data: each problem stops with path:line and what is wrong, or is skipped and counted."""

from __future__ import annotations

import pytest

import panda.data as data
from panda.errors import DataError, RecipeError
from tests.data.conftest import FIXTURES, make_recipe

BAD = FIXTURES / "bad"


def prepare_one(tokenizer, path, name="instruction", **data_keys):
    recipe = make_recipe([{"name": name, "path": str(path)}], max_seq_length=64, **data_keys)
    return data.prepare(recipe, tokenizer)


@pytest.mark.parametrize("file, message", [
    ("malformed.jsonl", "malformed.jsonl:2: invalid JSON: Expecting value (column 26)"),
    ("missing_field.jsonl", "missing_field.jsonl:1: missing field 'target' (the record has: "
                            "input)"),
    ("wrong_type.jsonl", "wrong_type.jsonl:1: field 'target': Input should be a valid string "
                         "(got 5)"),
    ("empty.jsonl", "empty.jsonl:1: empty file: no records"),
    ("malformed_array.json", "malformed_array.json:3: invalid JSON: Expecting property name "
                             "enclosed in double quotes (column 32); cannot read the rest of "
                             "the array"),
    ("not_object.jsonl", "not_object.jsonl:2: expected a JSON object, got an array"),
])
def test_each_problem_names_file_and_line(tokenizer, file, message):
    with pytest.raises(DataError) as caught:
        prepare_one(tokenizer, BAD / file)
    assert caught.value.message == f"{BAD / file}:{message.split(':', 1)[1]}"
    assert 'on_bad_record = "skip"' in caught.value.hint


def test_skip_counts_bad_records_per_file(tokenizer):
    prepared = prepare_one(tokenizer, BAD / "*.json*", on_bad_record="skip")
    stats = prepared.sources[0].stats
    assert stats.skipped == {str(BAD / "empty.jsonl"): 1, str(BAD / "malformed.jsonl"): 1,
                             str(BAD / "malformed_array.json"): 1,
                             str(BAD / "missing_field.jsonl"): 1,
                             str(BAD / "not_object.jsonl"): 1, str(BAD / "wrong_type.jsonl"): 1}
    # good records survive: 2 in malformed.jsonl, 1 before the bad array element, 1 in not_object
    assert stats.documents == 4
    assert stats.first_skipped[0].startswith(f"{BAD / 'empty.jsonl'}:1: empty file")


def test_only_bad_records_is_an_error_even_when_skipping(tokenizer):
    with pytest.raises(DataError, match=r"data.sources\[0\]: no usable records in .*wrong_type"
                                        r".jsonl \(1 records read, 1 skipped as bad\)"):
        prepare_one(tokenizer, BAD / "wrong_type.jsonl", on_bad_record="skip")


def test_paths_that_name_nothing(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[0\].path: .*nowhere.jsonl does not exist"):
        prepare_one(tokenizer, tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"data.sources\[0\].path: no file matches .*\*.parquet"):
        prepare_one(tokenizer, tmp_path / "*.parquet")
    (tmp_path / "notes.md").write_text("not data")
    with pytest.raises(DataError, match=r"no data files \(\*.json, \*.jsonl\) in "):
        prepare_one(tokenizer, tmp_path)


def test_default_path_is_the_pandallm_folder(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="dataset/instruction_tuning does not exist"):
        data.prepare(make_recipe([{"name": "instruction"}]), tokenizer)
    folder = tmp_path / "dataset" / "instruction_tuning"
    folder.mkdir(parents=True)
    (folder / "part-0.json").write_text('{"input": "1+1=", "target": "2"}\n')
    assert data.prepare(make_recipe([{"name": "instruction"}]), tokenizer).num_rows == 1


def test_all_zero_weights_fail_validation():
    with pytest.raises(RecipeError, match="every source has weight 0"):
        make_recipe([{"name": "instruction", "path": "x.jsonl", "weight": 0}])


def test_examples_without_a_target_after_truncation_are_counted(tokenizer, tmp_path):
    path = tmp_path / "long_prompt.jsonl"
    path.write_text('{"input": "' + "panda " * 40 + '", "target": "ok"}\n'
                    '{"input": "1 + 1 =", "target": "2"}\n', encoding="utf-8")
    stats = prepare_one(tokenizer, path).sources[0].stats
    assert (stats.records, stats.documents, stats.truncated, stats.no_target) == (2, 1, 1, 1)


def test_a_long_reply_is_truncated_and_counted(tokenizer, tmp_path):
    path = tmp_path / "long_reply.jsonl"
    path.write_text('{"input": "Say panda.", "target": "' + "panda " * 40 + '"}\n')
    prepared = prepare_one(tokenizer, path)
    stats = prepared.sources[0].stats
    assert (stats.documents, stats.truncated, stats.no_target) == (1, 1, 0)
    assert prepared.sources[0].store.lengths().tolist() == [64]


def test_unknown_chat_role_is_a_bad_record(tokenizer, tmp_path):
    path = tmp_path / "roles.jsonl"
    path.write_text('{"conversations": [{"from": "robot", "value": "hi"}]}\n')
    with pytest.raises(DataError, match=r"roles.jsonl:1: conversations\[0\]: unknown speaker "
                                        r"'robot' \(expected human, gpt or system\)"):
        prepare_one(tokenizer, path, name="sharegpt")
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="roles.jsonl:1: no assistant message: nothing to train on"):
        prepare_one(tokenizer, path, name="chat")


def test_bytes_that_are_not_utf8_are_a_bad_line_and_a_bom_is_fine(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"input": "a", "target": "b"}\n'
                     b'{"input": "caf\xe9", "target": "x"}\n'
                     b'{"input": "c", "target": "d"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2: not UTF-8 text \(invalid continuation "
                                        r"byte at byte 14\)"):
        prepare_one(tokenizer, path)
    stats = prepare_one(tokenizer, path, on_bad_record="skip").sources[0].stats
    assert (stats.documents, stats.skipped) == (2, {str(path): 1})


def test_cut_and_skipped_examples_are_logged_on_every_run(tokenizer, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    path.write_text('{"input": "Say panda.", "target": "' + "panda " * 40 + '"}\n{"input": 1}\n')
    for _ in range(2):  # the second run reads the counts from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="panda.data"):
            prepare_one(tokenizer, path, on_bad_record="skip")
        assert caplog.messages == ["data.sources[0]: 1 example(s) truncated to 64 tokens; "
                                   "1 bad record(s) skipped in 1 file(s) (panda data prepare "
                                   "shows details)"]
