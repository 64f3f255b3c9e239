"""benchmarks/lora_throughput.py runs on a CPU with --tiny: the plain transformers + peft loop
and panda's LoRA path train the same checkpoint on the same batches (equal first losses: the
adapters start at zero), and a complete JSON record is appended."""

from __future__ import annotations

import json

import pytest

def test_tiny_run_compares_like_with_like(tmp_path, load_benchmark):
    bench = load_benchmark("lora_throughput")
    results = tmp_path / "results.jsonl"
    record = bench.main(["--tiny", "--steps", "2", "--results", str(results)])
    assert json.loads(results.read_text()) == record
    assert record["settings"]["tiny"] and {"peft", "panda"} <= set(record["versions"])
    baseline, panda = record["results"]
    assert (baseline["variant"], panda["variant"]) == ("hf+peft lora", "panda lora")
    # same weights, same batch, adapters at zero: the same first loss, to fp32 rounding
    assert panda["first_loss"] == pytest.approx(baseline["first_loss"], rel=1e-5)
    assert panda["trainable_parameters"] == baseline["trainable_parameters"] > 0
    assert record["ratios"]["lora_speed_panda_over_hf"] > 0
