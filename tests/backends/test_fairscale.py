"""The fairscale backend in mode oss (OSS optimizer-state sharding + ShardedDataParallel) on
2 gloo processes on the CPU, fp32: the same losses as one process at the same global batch,
exact resume from its own checkpoint, and an exported Hugging Face folder that computes the
trained model's logits. FairScale's FSDP mode needs CUDA: tests/backends/test_gpu_backends.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fairscale")

from distributed_runs import (assert_export_matches_trained_model,  # noqa: E402
                              assert_losses_close, probe_logits, recipe_data, run,
                              validation_error)
from panda.errors import PandaError  # noqa: E402

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


@pytest.mark.slow
def test_two_ranks_match_one_process(single, oss):
    assert_losses_close(oss["losses"], single["losses"], LOSS_RTOL)
    assert_losses_close(oss["grad_norms"], single["grad_norms"], LOSS_RTOL)


@pytest.mark.slow
def test_resume_from_step_3_repeats_steps_4_and_5(oss, tmp_path):
    checkpoint = oss["output"] / "checkpoints" / "step-00000003"
    resumed = run(recipe_data(str(tmp_path / "resumed"), OSS, steps=STEPS, save_every=3,
                              batch_size=GLOBAL_BATCH // 2),
                  nproc=2, resume=str(checkpoint))
    assert resumed["losses"] == {step: oss["losses"][step] for step in (4, 5)}
    assert torch.equal(probe_logits(resumed), probe_logits(oss))  # the same final weights
    assert_export_matches_trained_model(resumed)


@pytest.mark.slow
def test_export_computes_the_trained_models_logits(oss):
    assert_export_matches_trained_model(oss)


# -- what fairscale cannot honor fails at `panda recipe validate`, or first thing at start ------

FAIRSCALE = "backend.name=\"fairscale\""
FSDP_MODE = "backend.mode=\"fsdp\""


@pytest.mark.parametrize("option", ["reshard_after_forward=false", "cpu_offload=true"])
def test_fsdp_mode_options_are_refused_in_oss_mode(option):
    error = validation_error(FAIRSCALE, f"backend.{option}")
    assert error.key == f"backend.{option.split('=')[0]}"
    assert "applies to mode = \"fsdp\" only" in str(error)


@pytest.mark.parametrize("overrides, key, says", [
    ((), "optim.name", "OSS steps each rank's share"),
    ((FSDP_MODE, "optim.grad_pre_normalization=false"), "optim.name",
     "flat shards that mix tensors"),
])
def test_nvlamb_is_refused_where_it_would_see_only_a_shard(overrides, key, says):
    error = validation_error(FAIRSCALE, "optim.name=\"nvlamb\"", *overrides)
    assert error.key == key and says in str(error)


def test_nvlamb_without_global_prenormalization_is_fine_with_oss():
    from panda.recipe import load

    load(Path(__file__).resolve().parents[2] / "recipes" / "demo.toml",
         [FAIRSCALE, "optim.name=\"nvlamb\"", "optim.grad_pre_normalization=false"])


def test_fsdp_mode_refuses_adafactor_compile_and_lora():
    assert validation_error(FAIRSCALE, FSDP_MODE, "optim.name=\"adafactor\"").key == "optim.name"
    assert validation_error(FAIRSCALE, FSDP_MODE, "train.compile=true").key == "train.compile"
    assert "does not work with backend 'fairscale'" in str(
        validation_error(FAIRSCALE, "lora.r=8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_mode_without_cuda_fails_before_building_anything():
    from panda import registry

    backend_class = registry.get("backend", "fairscale")
    backend = backend_class(backend_class.Options(mode="fsdp"))
    with pytest.raises(PandaError, match="needs CUDA GPUs") as error:
        backend.init_distributed()
    assert "backend.mode = \"oss\"" in error.value.hint
