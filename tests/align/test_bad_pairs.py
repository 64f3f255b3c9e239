"""Bad preference data stops `panda train` with `path:line`, the documented message and exit
code 2, or is skipped and counted with on_bad_record = "skip"."""

from __future__ import annotations

import json

import pytest

GOOD = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("record,says", [
    ({"prompt": "2 + 2?", "chosen": "4"}, "missing field 'rejected' (the record has: prompt, "
                                          "chosen)"),
    ({"prompt": "2 + 2?", "chosen": "4", "rejected": "4"},
     "chosen and rejected are the same reply: the pair expresses no preference"),
    ({"prompt": "2 + 2?", "chosen": 4, "rejected": "5"}, "field 'chosen'"),
], ids=["missing-rejected", "same-replies", "not-a-string"])
def test_a_bad_pair_stops_the_run_with_its_line(write_recipe, tmp_path, run_panda, record, says):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    result = run_panda("train", str(write_recipe("dpo", data=data, steps=1)))
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: {data}:2: "), result.stderr
    assert says in error[0]
    assert "Traceback" not in result.stderr


def test_bad_pairs_can_be_skipped_and_counted(write_recipe, tmp_path, run_panda):
    data = tmp_path / "pairs.jsonl"
    same = {"prompt": "a?", "chosen": "b", "rejected": "b"}
    data.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, same, GOOD)), encoding="utf-8")
    recipe = write_recipe("dpo", data=data, steps=1)
    text = recipe.read_text(encoding="utf-8")
    recipe.write_text(text.replace("max_seq_length = 64", 'max_seq_length = 64\n'
                                   'on_bad_record = "skip"'), encoding="utf-8")
    result = run_panda("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "1 bad record(s) skipped in 1 file(s)" in result.stdout + result.stderr
