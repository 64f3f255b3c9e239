"""``panda data prepare|inspect`` through the real command line."""

from __future__ import annotations

import pytest

from tests.data.conftest import FIXTURES


@pytest.fixture
def recipe(tmp_path):
    def write(sources: str, data: str = "max_seq_length = 64") -> str:
        path = tmp_path / "recipe.toml"
        path.write_text(f'[model]\npreset = "tiny-llama"\n\n[data]\n{data}\n\n{sources}',
                        encoding="utf-8")
        return str(path)

    return write


def source(name: str, path, extra: str = "") -> str:
    return f'[[data.sources]]\nname = "{name}"\npath = "{path}"\n{extra}\n'


def test_prepare_reports_each_source_then_hits_the_cache(run_panda, recipe, private_cache):
    path = recipe(source("chat", FIXTURES / "chat.jsonl") +
                  source("instruction", FIXTURES / "instruction.jsonl", "weight = 2"),
                  "max_seq_length = 64\neval_fraction = 0.34")
    env = {"PANDA_CACHE": str(private_cache)}
    first = run_panda("data", "prepare", path, env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "train split (lm data, max_seq_length 64, packing on)"
    assert "  data.sources[0] chat: 1 file(s), weight 1, tokenized now" in lines
    assert "  data.sources[1] instruction: 1 file(s), weight 2, tokenized now" in lines
    assert "    records 3, documents 2 in this split (3 in all), tokens 79" in lines
    assert any(line.startswith("eval split") for line in lines)
    assert any("packing efficiency" in line and "padding every document" in line for line in lines)
    assert lines[-1] == f"cache: {private_cache}"
    second = run_panda("data", "prepare", path, env=env)
    assert second.stdout.count("from the cache") == 4 and "tokenized now" not in second.stdout


def test_bad_data_is_one_line_and_exit_2(run_panda, recipe, private_cache):
    bad = FIXTURES / "bad" / "missing_field.jsonl"
    result = run_panda("data", "prepare", recipe(source("instruction", bad)),
                       env={"PANDA_CACHE": str(private_cache)})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-2:] == [
        f"error: {bad}:1: missing field 'target' (the record has: input)",
        'hint: fix the record, or set data.on_bad_record = "skip" to skip bad records and count '
        "them"]
    assert "Traceback" not in result.stderr


def test_skipping_reports_counts_per_file(run_panda, recipe, private_cache):
    path = recipe(source("instruction", FIXTURES / "bad" / "*.json*"),
                  'max_seq_length = 64\non_bad_record = "skip"')
    result = run_panda("data", "prepare", path, env={"PANDA_CACHE": str(private_cache)})
    assert result.returncode == 0, result.stderr
    assert "bad records skipped 6" in result.stdout
    assert f"    skipped 1 bad record(s) in {FIXTURES / 'bad' / 'malformed.jsonl'}" in result.stdout


def test_inspect_marks_trained_tokens_and_documents(run_panda, recipe, private_cache):
    path = recipe(source("sharegpt", FIXTURES / "sharegpt.jsonl"), "max_seq_length = 256")
    result = run_panda("data", "inspect", path, "--n", "1", env={"PANDA_CACHE": str(private_cache)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("train split, 1 rows; [[text]] = tokens that carry loss; the rest has "
                        "label -100")
    assert lines[2] == "row 0 (data.sources[0] sharegpt, row 0, 2 document(s))"
    text = "\n".join(lines)
    assert f"--- document from {FIXTURES / 'sharegpt.jsonl'}:1, " in text
    assert "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n[[Paris.</s>\n]]" in text
    assert "<|assistant|>\n[[北京。</s>\n]]" in text


def test_the_data_command_loads_nothing_heavy():
    import subprocess
    import sys

    probe = ("import sys, panda.cli.data_cmd; print(sorted(m for m in ('torch', 'transformers', "
             "'numpy', 'pyarrow', 'pydantic') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
