"""benchmarks/train_throughput.py runs on a CPU with --tiny, compares like with like (the
same model and batches give the same losses), and appends a complete JSON record."""

from __future__ import annotations

import json

import pytest

def test_tiny_run_writes_a_comparable_record(tmp_path, load_benchmark):
    bench = load_benchmark("train_throughput")
    results = tmp_path / "results.jsonl"
    record = bench.main(["--tiny", "--results", str(results)])
    assert json.loads(results.read_text()) == record
    assert record["settings"]["preset"] == "tiny-llama" and record["settings"]["tiny"]
    assert {"torch", "transformers", "panda"} <= set(record["versions"])
    hf, panda = record["results"]
    assert (hf["variant"], panda["variant"]) == ("hf", "panda")
    assert panda["last_loss"] == pytest.approx(hf["last_loss"], rel=1e-2)
    assert record["ratios"]["panda_over_hf"] > 0
