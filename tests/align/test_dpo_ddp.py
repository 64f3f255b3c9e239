"""DPO with DDP on CPU: `panda train --nproc 2` (2 gloo processes, 2 pairs each) follows the
single-process run at the same global batch (4 pairs): loss, gradient norm, reward metrics,
evaluation and final weights. Real CLI, data pipeline and plugins. (The precomputed reference
under several ranks: tests/align/test_sharded_backends.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_helpers import curve, panda_train
from panda.job import build_job, run_job
from panda.recipe import load

LR = 3e-3


def assert_same_runs(single: Path, ddp: Path) -> None:
    for key in ("loss", "grad_norm", "rewards/accuracy", "eval_loss"):
        assert curve(ddp, key) == pytest.approx(curve(single, key), rel=1e-5, abs=1e-7), key
    # a difference of rewards of size ~1, summed in another order: fp32 rounding is ~1e-7
    assert curve(ddp, "rewards/margin") == pytest.approx(curve(single, "rewards/margin"),
                                                         rel=1e-5, abs=1e-6)
    # (tokens_seen counts padded positions, which differ when each rank pads its own rows)
    reference = load_file(single / "final" / "model.safetensors")
    for name, value in load_file(ddp / "final" / "model.safetensors").items():
        # Adam moves every weight by about lr per step whatever its gradient's size, so for a
        # gradient near 0 fp32 summation-order noise can flip part of a step: allow 1/1000
        # of one step (lr = 3e-3)
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-3 * LR)


def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(write_recipe, tmp_path):
    settings = dict(method_options="beta = 0.1", lr=LR, steps=4, eval_every=2)
    run_job(build_job(load(write_recipe("dpo", name="single", batch=4, **settings)),
                      resume="never"))
    panda_train(write_recipe("dpo", name="ddp", batch=2, **settings), "--nproc", "2")
    assert_same_runs(tmp_path / "runs" / "single", tmp_path / "runs" / "ddp")
