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

from ds_workers import LOOP_CASES, ZERO_CASES, one_step_worker
from standins import collate, free_port, random_sequences, tiny_llama
from test_loss_normalization import CLIP, SEQUENCES, assert_same_weights, reference_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_cpu_ops")]

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

@pytest.fixture(scope="module")
def trained(deepspeed_runs):
    return deepspeed_runs


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
