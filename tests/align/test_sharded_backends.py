"""Preference methods on the sharded backends, 2 gloo processes on CPU: fsdp and DeepSpeed
ZeRO-3 follow one process at the same global batch step by step, for dpo (frozen and
precomputed reference) and rm, whose sharded export AutoModelForSequenceClassification loads.
Slow: each case starts a 2-process run."""

from __future__ import annotations

import pytest

from align_helpers import curve, panda_train
from panda.job import build_job, run_job
from panda.recipe import load

CASES = {  # id: (method, method options, backend, backend options)
    "dpo-fsdp": ("dpo", "beta = 0.1", "fsdp", ""),
    "dpo-precomputed-zero3": ("dpo", "beta = 0.1\nprecompute_ref = true", "deepspeed",
                              "zero_stage = 3"),
    "rm-zero3": ("rm", "", "deepspeed", "zero_stage = 3"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_backend_follows_one_process(write_recipe, tmp_path, case):
    method, options, backend, backend_options = CASES[case]
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    settings = dict(method_options=options, lr=3e-3, steps=3, eval_every=3)
    single = write_recipe(method, name="single", batch=4, **settings)
    run_job(build_job(load(single), resume="never"))
    sharded = write_recipe(method, name="sharded", batch=2, backend=backend, **settings)
    text = sharded.read_text(encoding="utf-8")
    sharded.write_text(text.replace(f'name = "{backend}"',
                                    f'name = "{backend}"\n{backend_options}'), encoding="utf-8")
    panda_train(sharded, "--nproc", "2")
    runs = {name: tmp_path / "runs" / name for name in ("single", "sharded")}
    for key in ("loss", "grad_norm", "rewards/accuracy", "eval_loss"):
        assert curve(runs["sharded"], key) == pytest.approx(curve(runs["single"], key),
                                                            rel=1e-5, abs=1e-6), key
    if method == "rm":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(runs["sharded"] / "final")
        assert model.config.num_labels == 1
