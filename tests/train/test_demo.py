"""The demo learns its task: single-digit addition accuracy goes from ~0 to above 90%.

Shortened to 150 steps (the full demo runs 300 and reaches 100%); 150 steps gave 99/100
when this test was written, fp32 on CPU with fixed seeds. Runs the real CLI end to end:
real data pipeline, the hf model plugin, sft, adamw, the warmup schedule, export.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 0.9


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(model, tokenizer) -> float:
    right, total, _ = load_script("demo_accuracy").accuracy(model, tokenizer)
    return right / total


def test_demo_data_is_what_the_script_writes(tmp_path):
    module = load_script("data/make_demo_data")
    train = module.records(module.PHRASINGS)
    assert len(train) == 100 and {"input": "7+5=", "target": "12"} in train
    committed = (ROOT / "recipes/data/demo_eval.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in committed] == module.records(module.PHRASINGS[:1])


def test_demo_accuracy_rises_above_threshold(tmp_path, run_panda, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the repository
    script = load_script("demo_accuracy")
    before = accuracy(*script.load_untrained("recipes/demo.toml"))
    out = tmp_path / "demo"
    trained = run_panda("train", "recipes/demo.toml", "--set", f"run.output_dir={out}",
                        "--set", "train.max_steps=150", "--set", "train.eval_every=50",
                        "--set", "train.save_every=0")
    assert trained.returncode == 0, trained.stderr
    after = accuracy(*script.load_trained(str(out / "final")))
    assert before < 0.1
    assert after >= THRESHOLD, f"accuracy {before:.0%} -> {after:.0%}"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert [e["step"] for e in evals] == [50, 100, 150]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
