"""benchmarks/train_throughput.py runs on a CPU with --tiny, compares like with like (the
same model and batches give the same losses), and appends a complete JSON record."""

from __future__ import annotations

import pytest


def test_tiny_run_writes_a_comparable_record(tiny_benchmark_record):
    record = tiny_benchmark_record("train_throughput")
    assert record["settings"]["preset"] == "tiny-llama"
    assert {"torch", "transformers"} <= set(record["versions"])
    hf, panda = record["results"]
    assert (hf["variant"], panda["variant"]) == ("hf", "panda")
    assert panda["last_loss"] == pytest.approx(hf["last_loss"], rel=1e-2)
    assert record["ratios"]["panda_over_hf"] > 0
