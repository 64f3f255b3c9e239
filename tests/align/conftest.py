"""Fixtures of the alignment tests: a private data cache and recipes on the tiny preference set."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"

RECIPE = """
[run]
name = "{method}"
output_dir = "{out}"
seed = 3

[model]
preset = "tiny-llama"
dtype = "float32"

[data]
max_seq_length = 64

[[data.sources]]
name = "{source}"
path = "{data}"

[[data.eval_sources]]
name = "preference"
path = "{eval_data}"

[method]
name = "{method}"
{method_options}

[optim]
lr = {lr}
max_grad_norm = 1.0

[schedule]
name = "constant"
warmup_steps = 0

[train]
per_device_batch_size = {batch}
gradient_accumulation_steps = {accumulation}
max_steps = {steps}
precision = "fp32"
log_every = 1
eval_every = {eval_every}
keep_last = 1

[backend]
name = "{backend}"

[log]
tensorboard = false
{extra}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "panda-cache"
    monkeypatch.setenv("PANDA_CACHE", str(cache))
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return cache


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe for ``method`` on the tiny preference set; returns its path."""

    def write(method: str, *, name: str | None = None, method_options: str = "",
              lr: float = 1e-3, batch: int = 4, accumulation: int = 1, steps: int = 6,
              eval_every: int = 0, backend: str = "auto", extra: str = "",
              data: Path = FIXTURES / "pairs.jsonl", source: str = "preference",
              eval_data: Path = FIXTURES / "eval_pairs.jsonl") -> Path:
        name = name or method
        path = tmp_path / f"{name}.toml"
        path.write_text(RECIPE.format(
            method=method, out=tmp_path / "runs" / name, data=data, source=source,
            eval_data=eval_data, method_options=method_options, lr=lr,
            batch=batch, accumulation=accumulation, steps=steps, eval_every=eval_every,
            backend=backend, extra=extra), encoding="utf-8")
        return path

    return write
