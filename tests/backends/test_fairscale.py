"""The fairscale backend in mode oss (OSS optimizer-state sharding + ShardedDataParallel) on
2 gloo processes on the CPU, fp32: the same losses as one process at the same global batch,
exact resume from its own checkpoint, and an exported Hugging Face folder that computes the
trained model's logits. FairScale's FSDP mode needs CUDA: tests/backends/test_gpu_backends.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fairscale")

from distributed_runs import (assert_export_matches_trained_model,  # noqa: E402
                              assert_losses_close, probe_logits, recipe_data, run)

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 4  # sequences per micro-batch over all ranks; 2 micro-batches per step
STEPS = 5
# fp32 on CPU: the ranks' gradients are summed in another order than one process sums
# them, so losses agree to rounding, not bit for bit.
LOSS_RTOL = 1e-5
OSS = {"name": "fairscale", "mode": "oss"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run(recipe_data(str(out / "run"), {"name": "single"}, steps=STEPS,
                           batch_size=GLOBAL_BATCH))


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    out = tmp_path_factory.mktemp("oss")
    return run(recipe_data(str(out / "run"), OSS, steps=STEPS, save_every=3,
                           batch_size=GLOBAL_BATCH // 2), nproc=2)


def test_two_ranks_match_one_process(single, oss):
    assert_losses_close(oss["losses"], single["losses"], LOSS_RTOL)
    assert_losses_close(oss["grad_norms"], single["grad_norms"], LOSS_RTOL)


def test_resume_from_step_3_repeats_steps_4_and_5(oss, tmp_path):
    checkpoint = oss["output"] / "checkpoints" / "step-00000003"
    resumed = run(recipe_data(str(tmp_path / "resumed"), OSS, steps=STEPS, save_every=3,
                              batch_size=GLOBAL_BATCH // 2),
                  nproc=2, resume=str(checkpoint))
    assert resumed["losses"] == {step: oss["losses"][step] for step in (4, 5)}
    assert torch.equal(probe_logits(resumed), probe_logits(oss))  # the same final weights
    assert_export_matches_trained_model(resumed)


def test_export_computes_the_trained_models_logits(oss):
    assert_export_matches_trained_model(oss)
