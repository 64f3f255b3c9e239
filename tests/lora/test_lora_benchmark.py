"""benchmarks/lora_throughput.py runs on a CPU with --tiny: the plain transformers + peft loop
and panda's LoRA path train the same checkpoint on the same batches (equal first losses: the
adapters start at zero), and a complete JSON record is appended."""

from __future__ import annotations

import pytest


def test_tiny_run_compares_like_with_like(tiny_benchmark_record):
    record = tiny_benchmark_record("lora_throughput", "--steps", "2")
    assert "peft" in record["versions"]
    baseline, panda = record["results"]
    assert (baseline["variant"], panda["variant"]) == ("hf+peft lora", "panda lora")
    # same weights, same batch, adapters at zero: the same first loss, to fp32 rounding
    assert panda["first_loss"] == pytest.approx(baseline["first_loss"], rel=1e-5)
    assert panda["trainable_parameters"] == baseline["trainable_parameters"] > 0
    assert record["ratios"]["lora_speed_panda_over_hf"] > 0
