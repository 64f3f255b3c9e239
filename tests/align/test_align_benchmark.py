"""benchmarks/align_throughput.py runs on a CPU with --tiny: TRL's DPOTrainer and panda's dpo
train the same model on the same token ids (both start at loss log 2), and a complete JSON
record is appended."""

from __future__ import annotations

import math

import pytest


def test_tiny_run_compares_like_with_like(tmp_path, monkeypatch, tiny_benchmark_record):
    pytest.importorskip("trl", reason="the benchmark compares against TRL")
    monkeypatch.chdir(tmp_path)  # TRL may write next to the working directory
    record = tiny_benchmark_record("align_throughput", "--steps", "2")
    assert "trl" in record["versions"]
    trl, panda = record["results"]
    assert (trl["variant"], panda["variant"]) == ("trl", "panda")
    # a random policy equal to its reference: both near log 2 over these few steps
    assert trl["mean_loss"] == pytest.approx(math.log(2), rel=2e-2)
    assert panda["mean_loss"] == pytest.approx(trl["mean_loss"], rel=2e-2)
    assert record["ratios"]["panda_over_trl_speed"] > 0
