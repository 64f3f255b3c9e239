"""A resumed DPO run continues exactly: the reference is rebuilt from the starting weights (or
its precomputed log-probs read back from the cache), not from the checkpoint's policy."""

from __future__ import annotations

import math

import pytest

from panda.job import build_job, run_job
from panda.recipe import load


@pytest.mark.parametrize("options", ["beta = 0.1", "beta = 0.1\nprecompute_ref = true"],
                         ids=["frozen-copy", "precomputed"])
def test_resumed_dpo_follows_the_uninterrupted_run(write_recipe, options):
    settings = dict(method_options=options, lr=3e-3, steps=4)
    whole = run_job(build_job(load(write_recipe("dpo", name="whole", **settings)),
                              resume="never"))["history"]
    recipe = write_recipe("dpo", name="cut", **settings)
    run_job(build_job(load(recipe, ["train.max_steps=2", "train.save_every=2"]),
                      resume="never"))
    resumed = run_job(build_job(load(recipe), resume="auto"))["history"]
    assert [entry["step"] for entry in resumed] == [3, 4]
    for a, b in zip(whole[2:], resumed):
        for key in ("loss", "grad_norm", "rewards/margin"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["step"], key)
