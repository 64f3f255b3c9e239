"""`panda eval --model PATH --data FILE` equals a hand-written loss over the same records."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from panda.models import tiny_tokenizer
from standins import tiny_llama

RECORDS = [{"input": "3+4=", "target": "7"}, {"input": "Name a colour: ", "target": "blue"},
           {"input": "9+9=", "target": "18"}]


def reference_loss(model, tokenizer) -> tuple[float, int]:
    """Each record alone: input untrained, target and </s> trained, mean over them."""
    total, count = 0.0, 0
    with torch.no_grad():
        for record in RECORDS:
            prompt = tokenizer(record["input"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(record["target"], add_special_tokens=False)["input_ids"]
            answer = answer + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
            total += float(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            count += len(answer)
    return total / count, count


def test_eval_matches_a_plain_computation(tmp_path, run_panda):
    model, tokenizer = tiny_llama(7), tiny_tokenizer.load()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    result = run_panda("eval", "--model", str(tmp_path / "model"), "--data", str(data),
                       "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected, count = reference_loss(model.eval(), tokenizer)
    assert got["tokens"] == count
    assert math.isclose(got["loss"], expected, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(expected), rel_tol=1e-5)


def test_eval_of_an_unrecognised_file_exits_2(tmp_path, run_panda):
    (tmp_path / "odd.jsonl").write_text('{"question": "?"}\n')
    result = run_panda("eval", "--model", str(tmp_path), "--data", str(tmp_path / "odd.jsonl"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot tell the format of")
