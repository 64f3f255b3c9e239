"""Shared test fixtures. Tests never download: tiny models from config, local data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def train_metrics(run_panda):
    """Run ``panda train RECIPE [ARGS]`` in a subprocess (it must succeed) and return the
    step records of ``metrics_dir``/metrics.jsonl that carry throughput."""
    import json

    def train(recipe: Path, metrics_dir: Path, *args: str, timeout: float = 900) -> list[dict]:
        done = run_panda("train", str(recipe), *args, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = (Path(metrics_dir) / "metrics.jsonl").read_text().splitlines()
        return [step for step in map(json.loads, lines) if "tokens_per_s" in step]

    return train


@pytest.fixture
def record_gpu_result():
    """Append one GPU measurement, with the device and versions, to benchmarks/results.jsonl."""
    import json
    import platform
    import time
    from importlib import metadata

    def record(benchmark: str, entry: dict) -> None:
        import torch
        import transformers

        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version()}
        for package in ("deepspeed", "peft", "bitsandbytes", "fairscale", "trl"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        line = {"benchmark": benchmark, "device": torch.cuda.get_device_name(), **versions,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
        with open(ROOT / "benchmarks" / "results.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    return record


@pytest.fixture
def load_benchmark():
    """A script of benchmarks/ imported by name (they are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def tiny_benchmark_record(tmp_path, load_benchmark):
    """Run ``benchmarks/NAME.py --tiny ARGS`` into a results file under tmp_path, check that
    the one JSON line it appended is the record it returned (marked tiny, naming panda's
    version), and return the record."""
    import json

    def run(name: str, *args: str) -> dict:
        results = tmp_path / "results.jsonl"
        record = load_benchmark(name).main(["--tiny", *args, "--results", str(results)])
        assert json.loads(results.read_text()) == record
        assert record["settings"]["tiny"] and "panda" in record["versions"]
        return record

    return run


@pytest.fixture
def run_panda():
    """Run the real `panda` CLI in a subprocess; returns CompletedProcess (text)."""

    def run(*args: str, cwd: Path | str = ROOT, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("PANDA_DEBUG", None)
        return subprocess.run([sys.executable, "-m", "panda", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Tests never fill the user's ~/.cache/panda; subprocesses inherit the variable."""
    previous = os.environ.get("PANDA_CACHE")
    os.environ["PANDA_CACHE"] = str(tmp_path_factory.mktemp("panda-cache"))
    yield
    if previous is None:
        os.environ.pop("PANDA_CACHE", None)
    else:
        os.environ["PANDA_CACHE"] = previous


@pytest.fixture(autouse=True)
def _registry_left_as_found():
    """A test's in-process registry.register() calls end with the test."""
    from panda import registry

    saved = {kind: dict(entries) for kind, entries in registry.registry._local.items()}
    yield
    registry.registry._local.clear()
    registry.registry._local.update(saved)
