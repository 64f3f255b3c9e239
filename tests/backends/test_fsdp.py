"""The fsdp backend (FSDP2) on 2 gloo processes on the CPU, fp32: the same losses as one
process at the same global batch, exact resume from its own sharded checkpoint, and an
exported Hugging Face folder that computes the trained model's logits."""

from __future__ import annotations

import pytest

import torch

from distributed_runs import (assert_export_matches_trained_model, assert_losses_close,
                              probe_logits, recipe_data, run, validation_error)

GLOBAL_BATCH = 4  # sequences per micro-batch over all ranks; 2 micro-batches per step
STEPS = 5
# fp32 on CPU: the ranks' gradients are summed in another order than one process sums
# them, so losses agree to rounding, not bit for bit.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run(recipe_data(str(out / "run"), {"name": "single"}, steps=STEPS,
                           batch_size=GLOBAL_BATCH))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return run(recipe_data(str(out / "run"), {"name": "fsdp"}, steps=STEPS, save_every=3,
                           batch_size=GLOBAL_BATCH // 2), nproc=2)


@pytest.mark.slow
def test_two_ranks_match_one_process(single, fsdp):
    assert_losses_close(fsdp["losses"], single["losses"], LOSS_RTOL)
    assert_losses_close(fsdp["grad_norms"], single["grad_norms"], LOSS_RTOL)


@pytest.mark.slow
def test_resume_from_step_3_repeats_steps_4_and_5(fsdp, tmp_path):
    checkpoint = fsdp["output"] / "checkpoints" / "step-00000003"
    assert (checkpoint / "sharded" / ".metadata").is_file()
    resumed = run(recipe_data(str(tmp_path / "resumed"), {"name": "fsdp"}, steps=STEPS,
                              save_every=3, batch_size=GLOBAL_BATCH // 2),
                  nproc=2, resume=str(checkpoint))
    # Same shards, same reduction order, same data position and RNG: bit for bit.
    assert resumed["losses"] == {step: fsdp["losses"][step] for step in (4, 5)}
    assert torch.equal(probe_logits(resumed), probe_logits(fsdp))  # the same final weights
    assert_export_matches_trained_model(resumed)


@pytest.mark.slow
def test_export_computes_the_trained_models_logits(fsdp):
    assert_export_matches_trained_model(fsdp)


@pytest.mark.slow
def test_offload_checkpointing_and_no_reshard_change_nothing_but_memory(single, tmp_path):
    # On a CPU host the offload policy must not pin memory (that needs an accelerator), and
    # the recomputation in backward must gather the block's weights again.
    backend = {"name": "fsdp", "cpu_offload": True, "activation_checkpointing": True,
               "reshard_after_forward": False}
    result = run(recipe_data(str(tmp_path / "run"), backend, steps=STEPS,
                             batch_size=GLOBAL_BATCH // 2), nproc=2)
    assert_losses_close(result["losses"], single["losses"], LOSS_RTOL)
    assert_export_matches_trained_model(result)


# -- what fsdp cannot honor fails at `panda recipe validate` -----------------------------------

@pytest.mark.parametrize("optim, says", [
    ("adafactor", "factored statistics as plain tensors"),
    ("adamw8bit", "bitsandbytes issue 1633"),
])
def test_optimizers_that_cannot_update_sharded_weights_are_refused(optim, says):
    error = validation_error("backend.name=\"fsdp\"", f"optim.name=\"{optim}\"")
    assert error.key == "optim.name" and says in str(error)


def test_two_kinds_of_activation_checkpointing_are_refused():
    error = validation_error("backend.name=\"fsdp\"", "backend.activation_checkpointing=true",
                             "model.gradient_checkpointing=true")
    assert error.key == "backend.activation_checkpointing"
    assert "set one of the two" in str(error)


def test_quantized_base_is_refused():
    error = validation_error("backend.name=\"fsdp\"", "lora.r=8", "quant.bits=4")
    assert error.key == "quant" and "cannot be sharded" in str(error)


def test_cli_validate_says_why(run_panda):
    result = run_panda("recipe", "validate", "recipes/demo.toml", "--set",
                       "backend.name=\"fsdp\"", "--set", "optim.name=\"adafactor\"")
    assert result.returncode == 2
    assert "optim.name: adafactor (transformers) keeps its factored statistics" in result.stderr


# -- only rank 0 builds the whole model (backend.load_on_rank0, "auto") -----------------------

@pytest.mark.slow
def test_other_ranks_start_empty_and_receive_rank0s_weights(tmp_path):
    """2 ranks: rank 1 builds the model on the meta device, and after sharding the model
    computes what the whole model computes: weights and buffers (rotary frequencies) came
    over from rank 0, for a preset and for a checkpoint."""
    import torch.multiprocessing as mp

    from distributed_runs import built_and_filled_worker, whole_model_logits
    from standins import free_port, tiny_llama

    from panda.models import tiny_tokenizer

    tiny_llama(3).save_pretrained(tmp_path / "checkpoint")
    tiny_tokenizer.load().save_pretrained(tmp_path / "checkpoint")
    models = [{"preset": "tiny-llama"}, {"path": str(tmp_path / "checkpoint")}]
    mp.spawn(built_and_filled_worker, args=(2, free_port(), str(tmp_path), models), nprocs=2,
             join=True)
    for index, model in enumerate(models):
        saved = torch.load(tmp_path / f"{index}.pt", weights_only=True)
        assert saved["built_empty"] == [False, True]
        expected = whole_model_logits(str(tmp_path), model)
        for logits in saved["logits"]:  # rank 0's forward and rank 1's
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_a_full_weights_dpo_reference_cannot_start_empty(tmp_path):
    from panda.backends.base import needs_full_reference_copy
    from panda.errors import RecipeError
    from panda.recipe import load

    recipe = tmp_path / "dpo.toml"
    text = ('[model]\npreset = "tiny-llama"\n[[data.sources]]\nname = "preference"\n'
            'path = "pairs.jsonl"\n[method]\nname = "dpo"\n[backend]\nname = "fsdp"\n')
    recipe.write_text(text + "load_on_rank0 = true\n")
    with pytest.raises(RecipeError, match="backend.load_on_rank0 = false"):
        load(recipe)
    recipe.write_text(text)  # "auto": every rank builds the whole model for dpo's copy
    loaded = load(recipe)
    assert loaded.backend.options.load_on_rank0 == "auto" and needs_full_reference_copy(loaded)
