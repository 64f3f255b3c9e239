"""Metrics: the MFU arithmetic, the peak table, and what each sink writes."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from panda.train import metrics
from standins import tiny_llama

LOG = SimpleNamespace(jsonl=True, tensorboard=True, wandb=False, wandb_project=None)


def test_flops_per_token_is_6n_plus_attention_term():
    model = tiny_llama(0)  # untied: the input embedding is a lookup, lm_head a matmul
    config = model.config
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = n_total - config.vocab_size * config.hidden_size
    expected = 6 * n_matmul + 12 * config.num_hidden_layers * config.hidden_size * 128
    assert metrics.flops_per_token(model, 128) == expected


def test_peak_table_and_override():
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert metrics.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert metrics.peak_tflops("cpu", "fp32") is None
    assert metrics.peak_tflops("cpu", "fp32", override=2.5) == 2.5


def test_mfu_is_achieved_flops_over_peak(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(lambda seq: 1e9 * seq, peak=10.0, world_size=2)
    meter.add(tokens=4000, seq_len=5)
    report = meter.report()
    assert report["tokens_per_s"] == 2000.0
    assert report["mfu"] == pytest.approx(4000 * 5e9 / 2.0 / (10e12 * 2))


def test_logger_writes_jsonl_tensorboard_and_plain_lines(tmp_path, capsys):
    logger = metrics.MetricsLogger(tmp_path, LOG, is_main=True, total_steps=4)
    logger.step(1, None)
    logger.step(2, {"loss": 2.5, "grad_norm": 1.25, "lr": 1e-3, "tokens_per_s": 1234.0,
                    "mfu": 0.42, "peak_mem_gb": 1.5})
    logger.eval(2, {"eval_loss": 2.0, "eval_ppl": 7.389})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 2/4 | loss 2.5000 | grad 1.250 | lr 1.00e-03 | "
                               "1,234 tok/s | mfu 42.0% | mem 1.50 GB | eta ")
    assert lines[1] == "eval at step 2 | eval_loss 2.0000 | eval_ppl 7.39"
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 2, "loss": 2.5, "grad_norm": 1.25, "lr": 1e-3,
                        "tokens_per_s": 1234.0, "mfu": 0.42, "peak_mem_gb": 1.5},
                       {"step": 2, "eval_loss": 2.0, "eval_ppl": 7.389}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.5]
    assert [e.step for e in events.Scalars("eval/loss")] == [2]


def test_resume_drops_lines_the_cut_off_run_logged_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    logger = metrics.MetricsLogger(tmp_path, SimpleNamespace(**{**vars(LOG), "tensorboard":
                                                                False}),
                                   is_main=True, total_steps=10, resume_step=5)
    logger.step(6, {"loss": 0.5})
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_terminal_gets_a_rich_progress_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    console = metrics.Console(total_steps=10, start_step=0, stream=stream)
    console.advance(5, {"loss": 1.5, "lr": 1e-4})
    console.close()
    shown = stream.getvalue()
    assert "5/10" in shown and "loss 1.5000" in shown


def test_other_ranks_report_nothing(tmp_path, capsys):
    logger = metrics.MetricsLogger(tmp_path / "r1", LOG, is_main=False, total_steps=4)
    logger.step(2, {"loss": 1.0})
    logger.message("hello")
    logger.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "r1").exists()
