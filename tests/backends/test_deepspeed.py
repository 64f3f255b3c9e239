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


@pytest.mark.slow
def test_every_zero_stage_takes_the_reference_step(tmp_path, deepspeed_cpu_ops):
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


@pytest.mark.slow
@pytest.mark.parametrize("name", LOOP_CASES)
def test_five_steps_match_a_single_process(trained, name):
    tmp, reference_losses, _ = trained
    losses = [step["loss"] for step in summary(tmp, name)["history"]]
    assert losses == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOOP_CASES)
def test_resume_from_own_checkpoint_gives_the_same_losses(trained, name):
    tmp, _, _ = trained
    full = summary(tmp, name)["history"]
    resumed = summary(tmp, f"{name}-resumed")["history"]
    assert [step["step"] for step in resumed] == [4, 5]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full[3:]], rel=1e-6)
    checkpoint = tmp / name / "checkpoints" / "step-00000005"
    assert (checkpoint / "deepspeed" / "state").is_dir() and (checkpoint / "hf-meta").is_dir()


@pytest.mark.slow
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


# -- what the recipe may ask for --------------------------------------------------------------

def recipe_error(backend, **sections):
    """The one-line error of a recipe with this [backend] (and other sections), or None."""
    from panda import recipe as recipe_io
    from panda.errors import PandaError

    data = {"model": {"preset": "tiny-llama"},
            "data": {"sources": [{"name": "instruction", "path": "data.jsonl"}]},
            "backend": backend, **sections}
    try:
        recipe_io.validate(data)
    except PandaError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("backend, expected", [
    ({"zero_stage": 2, "offload_params": "cpu"},
     "backend.offload_params: parameter offload needs zero_stage = 3 (got 2)"),
    ({"zero_stage": 0, "offload_optimizer": "cpu"},
     "backend.offload_optimizer: optimizer offload needs zero_stage >= 1"),
    ({"zero_stage": 2, "offload_optimizer": "nvme", "nvme_path": "/nvme"},
     "backend.offload_optimizer: optimizer offload to nvme needs zero_stage = 3"),
    ({"zero_stage": 3, "offload_params": "nvme"},
     "backend.nvme_path: offload to nvme needs nvme_path"),
])
def test_offload_settings_a_stage_cannot_honour_are_refused(backend, expected):
    assert expected in recipe_error({"name": "deepspeed", **backend})


def test_nvme_offload_with_a_path_validates():
    assert recipe_error({"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "nvme",
                         "offload_params": "nvme", "nvme_path": "/local_nvme"}) is None


def test_config_file_must_agree_with_the_recipe(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"gradient_accumulation_steps": 8, "gradient_clipping": "auto",
                                  "zero_optimization": {"reduce_bucket_size": 5e8}}))
    error = recipe_error({"name": "deepspeed", "config_file": str(config)},
                         train={"gradient_accumulation_steps": 4})
    assert "gradient_accumulation_steps = 8 but the recipe's " \
           "train.gradient_accumulation_steps gives 4" in error
    config.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert "has an \"optimizer\" section; panda builds it from the recipe's [optim]" in \
        recipe_error({"name": "deepspeed", "config_file": str(config)})


def test_generated_config_takes_extra_keys_and_recipe_values(tmp_path):
    from panda import recipe as recipe_io
    from panda.backends.deepspeed_config import build_config

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": "auto", "steps_per_print": 10,
                                  "zero_optimization": {"reduce_bucket_size": 1000}}))
    recipe = recipe_io.validate({
        "model": {"preset": "tiny-llama"},
        "data": {"sources": [{"name": "instruction", "path": "data.jsonl"}]},
        "train": {"per_device_batch_size": 2, "gradient_accumulation_steps": 4,
                  "precision": "bf16"},
        "optim": {"max_grad_norm": 0.5},
        "backend": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                    "config_file": str(config)}})
    built = build_config(recipe, recipe.backend.options, data_parallel_size=8, ds_cpu_adam=True)
    assert built["train_batch_size"] == 2 * 4 * 8
    assert built["gradient_clipping"] == 0.5 and built["bf16"]["enabled"] is True
    assert built["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000,
                                          "offload_optimizer": {"device": "cpu",
                                                                "pin_memory": True}}
    assert built["steps_per_print"] == 10  # the file may change panda's defaults
    # a world size that contradicts the file's batch total is caught at run time
    config.write_text(json.dumps({"train_batch_size": 16}))
    with pytest.raises(Exception, match="train_batch_size = 16 but the recipe's"):
        build_config(recipe, recipe.backend.options, data_parallel_size=8)


def test_a_missing_deepspeed_names_the_extra(monkeypatch):
    import sys

    from panda.backends.deepspeed import import_deepspeed
    from panda.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as caught:
        import_deepspeed()
    assert str(caught.value) == ("backend 'deepspeed' needs DeepSpeed: "
                                 "pip install 'pandallm[deepspeed]'")
