"""The ``deepspeed`` backend on CPU with 2 gloo ranks: ZeRO 0-3 (and ZeRO-3 with CPU offload)
give the step a plain PyTorch step gives (DESIGN section 6), train 5 steps with the losses of a
single process at the same global batch, resume from their own checkpoints to the same losses,
and export a Hugging Face folder whose logits are the trained model's.

Tolerances (fp32): losses rel 1e-5 against the single process (ZeRO reduces gradients in
another order and flattens them into buckets, so sums differ in the last bits); a resumed run
reproduces the uninterrupted one to rel 1e-6; exported logits atol 1e-5.

Every case of a test runs inside one 2-process launch: starting processes that import
DeepSpeed costs more than the cases themselves on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from ds_workers import one_step_worker, train_worker
from standins import collate, free_port, random_sequences, tiny_llama
from test_loss_normalization import CLIP, SEQUENCES, assert_same_weights, reference_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_cpu_ops")]

ZERO_CASES = {
    "zero0": {"name": "deepspeed", "zero_stage": 0},
    "zero1": {"name": "deepspeed", "zero_stage": 1},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "zero3-offload": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                      "offload_params": "cpu", "pin_memory": False},
}


def test_every_zero_stage_takes_the_reference_step(tmp_path):
    # rank 0 gets sequences 0 and 2, rank 1 gets 1 and 3: unequal token counts per rank,
    # two micro-batches each (accumulation), with and without clipping
    micro_batches = [[[SEQUENCES[0]], [SEQUENCES[2]]], [[SEQUENCES[1]], [SEQUENCES[3]]]]
    cases = [{"name": f"{name}-clip{clip}", "backend": backend, "clip": clip}
             for name, backend in ZERO_CASES.items() for clip in (0.0, CLIP)]
    mp.spawn(one_step_worker, args=(2, free_port(), str(tmp_path), cases, micro_batches),
             nprocs=2, join=True)
    for clip in (0.0, CLIP):
        ref_loss, ref_state = reference_step(clip)
        for name in ZERO_CASES:
            saved = torch.load(tmp_path / f"{name}-clip{clip}.pt", weights_only=True)
            assert saved["result"]["units"] == 30 and saved["result"]["nonfinite"] == 0.0
            assert abs(saved["result"]["loss"] - ref_loss) <= 1e-5 * ref_loss, name
            assert_same_weights(saved["state"], ref_state)


# -- the whole loop: 5 steps, resume, export -------------------------------------------------

TRAIN = {"per_device_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5,
         "save_every": 1, "keep_last": 5}
LOOP_CASES = ("zero1", "zero2", "zero3", "zero3-offload")


def single_process_reference(tmp_path):
    """The same 5 steps in one process: batch 4 = 2 ranks x 2, same order of sequences."""
    import panda.job
    from panda import recipe as recipe_io
    from standins import register_standins, standin_build_data, standin_recipe_data

    register_standins()
    original = panda.job.build_data
    panda.job.build_data = standin_build_data(64)
    try:
        data = standin_recipe_data(str(tmp_path / "single"),
                                   **{**TRAIN, "per_device_batch_size": 4, "save_every": 0})
        data["backend"] = {"name": "single"}
        summary = panda.job.train(recipe_io.validate(data))
    finally:
        panda.job.build_data = original
    return [step["loss"] for step in summary["history"]], tmp_path / "single" / "final"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every loop case trained 5 steps, then resumed from its step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("deepspeed-loop")
    runs = []
    for name in LOOP_CASES:
        runs.append({"output_dir": str(tmp / name), "summary": str(tmp / f"{name}.json"),
                     "backend": ZERO_CASES[name], "train": TRAIN})
        runs.append({"output_dir": str(tmp / f"{name}-resumed"),
                     "summary": str(tmp / f"{name}-resumed.json"), "backend": ZERO_CASES[name],
                     "train": TRAIN,
                     "resume": str(tmp / name / "checkpoints" / "step-00000003")})
    ports = [free_port() for _ in runs]
    mp.spawn(train_worker, args=(2, ports, runs), nprocs=2, join=True)
    reference_losses, reference_final = single_process_reference(tmp)
    return tmp, reference_losses, reference_final


def summary(tmp, name):
    return json.loads((tmp / f"{name}.json").read_text())


@pytest.mark.parametrize("name", LOOP_CASES)
def test_five_steps_match_a_single_process(trained, name):
    tmp, reference_losses, _ = trained
    losses = [step["loss"] for step in summary(tmp, name)["history"]]
    assert losses == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.parametrize("name", LOOP_CASES)
def test_resume_from_own_checkpoint_gives_the_same_losses(trained, name):
    tmp, _, _ = trained
    full = summary(tmp, name)["history"]
    resumed = summary(tmp, f"{name}-resumed")["history"]
    assert [step["step"] for step in resumed] == [4, 5]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full[3:]], rel=1e-6)
    checkpoint = tmp / name / "checkpoints" / "step-00000005"
    assert (checkpoint / "deepspeed" / "state").is_dir() and (checkpoint / "hf-meta").is_dir()


@pytest.mark.parametrize("name", LOOP_CASES)
def test_export_is_a_hugging_face_folder_with_the_trained_logits(trained, name):
    from transformers import AutoModelForCausalLM

    tmp, _, reference_final = trained
    batch = collate(random_sequences(3, seed=9))
    exported = AutoModelForCausalLM.from_pretrained(tmp / name / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_final).eval()
    with torch.no_grad():
        got = exported(input_ids=batch["input_ids"]).logits
        want = reference(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and not merely the initial weights
    with torch.no_grad():
        initial = tiny_llama(0)(input_ids=batch["input_ids"]).logits
    assert (got - initial).abs().max() > 1e-3
