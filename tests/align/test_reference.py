"""DPO's reference: the LoRA base with the adapter off gives the frozen copy's log-probs without
a second copy of the weights, precompute_ref trains exactly like a live reference, and
gradient accumulation and batch size change nothing but speed."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from align_helpers import job_context, pair_batch, random_pairs, tiny_llama
from panda.job import build_job, run_job
from panda.plugins.methods.dpo import Dpo
from panda.plugins.methods.reference import FrozenCopy, StartingPolicy
from panda.recipe import load
from panda.recipe_schema import LoraSection

PAIRS = random_pairs(3, seed=8)


def parameters_held() -> int:
    """Elements of every distinct parameter storage alive in this process."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.nn.Parameter and not obj.is_meta:  # isinstance warns on odd objects
            storages[obj.untyped_storage().data_ptr()] = obj.numel()
    return sum(storages.values())


def lora_policy():
    from panda.adapters import apply_lora

    model = apply_lora(tiny_llama(0), LoraSection(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # as after some training: the adapter changes the outputs
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def test_lora_reference_is_the_base_and_keeps_one_copy_of_the_weights():
    policy = lora_policy()
    before = parameters_held()
    method = Dpo(Dpo.Options())
    method.prepare(policy, job_context(lora=LoraSection(r=4)))
    assert parameters_held() == before  # no second copy of the base
    assert isinstance(method.reference, StartingPolicy)

    batch = pair_batch(PAIRS)
    from_lora_base = method.reference.pair_logps(policy, batch)
    from_copy = FrozenCopy(tiny_llama(0)).pair_logps(None, batch)
    torch.testing.assert_close(from_lora_base.chosen, from_copy.chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_lora_base.rejected, from_copy.rejected, rtol=1e-6, atol=1e-6)
    # the adapter is back on afterwards, and it does change the policy's log-probs
    from panda.plugins.methods.preference import policy_pair_logps

    with torch.no_grad():
        assert not torch.allclose(policy_pair_logps(policy, batch).chosen, from_copy.chosen)
    assert policy.training  # the reference pass put the mode back


def test_full_fine_tuning_reference_is_a_frozen_copy():
    policy = tiny_llama(0)
    before = parameters_held()
    method = Dpo(Dpo.Options())
    method.prepare(policy, job_context())
    assert parameters_held() == 2 * before
    assert isinstance(method.reference, FrozenCopy)
    assert not any(p.requires_grad for p in method.reference.model.parameters())


def history(write_recipe, name, **settings):
    job = build_job(load(write_recipe("dpo", name=name, **settings)), resume="never")
    return run_job(job)["history"]


def test_precomputed_reference_trains_exactly_like_the_live_one(write_recipe, private_cache):
    live = history(write_recipe, "live", method_options="beta = 0.1", steps=5, lr=3e-3,
                   eval_every=5)
    options = "beta = 0.1\nprecompute_ref = true"
    first = history(write_recipe, "pre", method_options=options, steps=5, lr=3e-3,
                    eval_every=5)
    cached = list((private_cache / "ref_logps").iterdir())
    assert len(cached) == 2  # the train and the eval split, next to the token cache
    again = history(write_recipe, "again", method_options=options, steps=5, lr=3e-3,
                    eval_every=5)
    assert list((private_cache / "ref_logps").iterdir()) == cached  # read, not recomputed
    for run in (first, again):
        for step, (a, b) in enumerate(zip(live, run)):
            for key in ("loss", "grad_norm", "rewards/margin"):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (step, key)


@pytest.mark.parametrize("batch,accumulation", [(2, 2), (1, 4)])
def test_accumulation_and_batch_size_change_nothing_but_speed(write_recipe, batch,
                                                              accumulation):
    whole = history(write_recipe, "whole", method_options="beta = 0.5", steps=3, lr=3e-3,
                    batch=4, accumulation=1)
    split = history(write_recipe, f"split{batch}", method_options="beta = 0.5", steps=3,
                    lr=3e-3, batch=batch, accumulation=accumulation)
    for step, (a, b) in enumerate(zip(whole, split)):
        assert a["units"] == b["units"] == 4
        # grad_norm is taken before clipping: a mis-scaled gradient would show here
        for key in ("loss", "grad_norm", "rewards/accuracy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (step, key)
