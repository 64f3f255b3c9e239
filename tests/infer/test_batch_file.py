"""Batch files: every line answered once with its id, resumable after a kill, bad lines named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from panda.errors import DataError


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def expected_answers(backend, requests, max_new_tokens):
    """What the library gives for each request, one at a time (batch size 1, greedy)."""
    from panda.infer.generation import complete
    from panda.infer.runner import encode_request
    from panda.infer.sampling import Sampling

    prompts = [encode_request(backend, prompt=r.get("prompt"), messages=r.get("messages"),
                              system=r.get("system")) for r in requests]
    done = complete(backend, prompts, Sampling(temperature=0, max_new_tokens=max_new_tokens),
                    batch_size=1)
    return {r["id"]: c.text for r, c in zip(requests, done)}


def read_output(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_round_trip_and_resume_after_kill(run_panda, tiny_model_dir, hf_backend, tmp_path):
    requests = [{"id": f"q{i}", "prompt": f"question number {i} " * (1 + i % 4)}
                for i in range(8)]
    requests[3] = {"id": "q3", "system": "be brief", "prompt": "hi"}
    requests[5] = {"id": "q5", "messages": [{"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": "hi"},
                                            {"role": "user", "content": "how are you"}]}
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [json.dumps(r) for r in requests])
    max_new = 40
    args = [sys.executable, "-m", "panda", "infer", "--model", str(tiny_model_dir),
            "--input", str(source), "--output", str(answers), "--temperature", "0",
            "--max-new-tokens", str(max_new), "--batch-size", "1"]

    # Kill a real run once it has written some answers but not all.
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if answers.exists() and answers.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the run finished before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    written = read_output(answers)
    assert 2 <= len(written) < len(requests)
    # A write torn by the kill: the rerun must cut it off, not choke on it or keep it.
    with answers.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "q7", "output": "par')

    result = run_panda("infer", "--model", str(tiny_model_dir), "--input", str(source),
                       "--output", str(answers), "--temperature", "0",
                       "--max-new-tokens", str(max_new), "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(written)} of {len(requests)} already answered" in result.stderr

    final = read_output(answers)
    ids = [record["id"] for record in final]
    assert sorted(ids) == sorted(r["id"] for r in requests)  # each exactly once
    assert final[:len(written)] == written  # earlier answers kept as they were
    expected = expected_answers(hf_backend, requests, max_new)
    assert {record["id"]: record["output"] for record in final} == expected
    for record in final:
        assert record["finish_reason"] in ("stop", "length")
        assert record["completion_tokens"] <= max_new


def test_batched_by_length_gives_the_same_answers(hf_backend, tmp_path):
    from panda.infer.runner import answer_file
    from panda.infer.sampling import Sampling

    requests = [{"id": i, "prompt": "word " * (1 + (i * 7) % 11)} for i in range(10)]
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [json.dumps(r) for r in requests])
    answered, skipped = answer_file(hf_backend, str(source), str(answers),
                                    Sampling(temperature=0, max_new_tokens=12), batch_size=4)
    assert (answered, skipped) == (10, 0)
    got = {record["id"]: record["output"] for record in read_output(answers)}
    assert got == expected_answers(hf_backend, requests, 12)


def test_bad_input_line_exits_2_with_path_and_line(run_panda, tiny_model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    write_lines(source, ['{"id": 1, "prompt": "fine"}', "", '{"id": 2, "prompt": "oops"'])
    result = run_panda("infer", "--model", str(tiny_model_dir), "--input", str(source),
                       "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {source}:3: not valid JSON "
                                     "(Expecting ',' delimiter at column 27)")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("line, message", [
    ('["a list"]', "expected a JSON object, got list"),
    ('{"id": 1}', 'give exactly one of "prompt" (text) or "messages"'),
    ('{"prompt": 3}', '"prompt" must be a string'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be"),
    ('{"id": 1.5, "prompt": "x"}', '"id" must be a string or an integer'),
])
def test_each_kind_of_bad_line_is_named(tmp_path, line, message):
    from panda.infer.batch_file import read_requests

    source = tmp_path / "in.jsonl"
    write_lines(source, ['{"prompt": "ok"}', line])
    with pytest.raises(DataError) as caught:
        read_requests(source)
    assert caught.value.message.startswith(f"{source}:2: {message}")


def test_duplicate_ids_are_refused(tmp_path):
    from panda.infer.batch_file import read_requests

    source = tmp_path / "in.jsonl"
    write_lines(source, ['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'])
    with pytest.raises(DataError, match=rf"{source}:2: duplicate id 'a' \(first on {source}:1\)"):
        read_requests(source)


def test_partial_last_line_is_cut_and_corrupt_middle_line_refused(tmp_path):
    from panda.infer.batch_file import answered_ids, id_key

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "output": "a"}\n{"id": "1", "output": "b"}\n{"id": 3, "outp')
    assert answered_ids(out) == {id_key(1), id_key("1")}
    assert out.read_text() == '{"id": 1, "output": "a"}\n{"id": "1", "output": "b"}\n'

    out.write_text('{"id": 1, "output": "a"}\ngarbage\n{"id": 2, "output": "b"}\n')
    with pytest.raises(DataError, match=rf"{out}:2: not a panda output line"):
        answered_ids(out)
