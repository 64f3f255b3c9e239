"""DESIGN section 6: a step's loss is the sum over all its target tokens divided by their
count, whatever the split into micro-batches and ranks (fp32, CPU, variable lengths)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from standins import (backend_job, collate, ddp_step_worker, free_port, next_token_loss,
                      random_sequences, tiny_llama)

SEQUENCES = random_sequences(4, seed=3, min_len=3, max_len=20)
LR, CLIP = 0.05, 0.5


def reference_step(clip):
    """A plain PyTorch step: each sequence on its own (no padding), one mean, clip, SGD."""
    model = tiny_llama(0)
    total, count = torch.zeros(()), 0
    for seq in SEQUENCES:
        loss_sum, n = next_token_loss(model, collate([seq]))
        total, count = total + loss_sum, count + int(n)
    loss = total / count
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return loss.item(), model.state_dict()


def single_step(tmp, batch_size, accumulation, clip):
    job = backend_job(str(tmp), "single", batch_size=batch_size, accumulation=accumulation,
                      max_grad_norm=clip, lr=LR)
    micro = [collate(SEQUENCES[i:i + batch_size]) for i in range(0, 4, batch_size)]
    result = job.backend.train_step(micro)
    return result, job.backend.unwrapped.state_dict()


def assert_same_weights(state, reference):
    initial = tiny_llama(0).state_dict()
    for name, value in reference.items():
        # Compare the updates themselves: a mis-scaled gradient changes them even when
        # the updated weights are close to the initial ones.
        torch.testing.assert_close(state[name] - initial[name], value - initial[name],
                                   rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-8)


def test_clipping_case_really_clips():
    unclipped = tiny_llama(0)
    l, n = zip(*(next_token_loss(unclipped, collate([s])) for s in SEQUENCES))
    (sum(l) / sum(int(c) for c in n)).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in unclipped.parameters()])
    assert norm > CLIP  # otherwise clipping would not check the gradient scale


# Without clipping, SGD's update is proportional to the gradient, so any mis-scaling
# shows; with clipping, the norm that decides the clip must be the step's too.
@pytest.mark.parametrize("clip", [0.0, CLIP])
def test_four_by_one_equals_one_by_four_equals_reference(tmp_path, clip):
    ref_loss, ref_state = reference_step(clip)
    for batch_size, accumulation in ((4, 1), (1, 4), (2, 2)):
        result, state = single_step(tmp_path, batch_size, accumulation, clip)
        assert result["units"] == sum(sum(1 for x in s["labels"][1:] if x != -100)
                                      for s in SEQUENCES)
        assert abs(result["loss"] - ref_loss) <= 1e-5 * ref_loss, (batch_size, accumulation)
        assert_same_weights(state, ref_state)


@pytest.mark.parametrize("clip", [0.0, CLIP])
def test_two_gloo_ranks_by_one_by_two_equal_reference(tmp_path, clip):
    ref_loss, ref_state = reference_step(clip)
    # rank 0 gets sequences 0 and 2, rank 1 gets 1 and 3: unequal token counts per rank
    micro_batches = [[[SEQUENCES[0]], [SEQUENCES[2]]], [[SEQUENCES[1]], [SEQUENCES[3]]]]
    mp.spawn(ddp_step_worker, args=(2, free_port(), str(tmp_path), micro_batches, 1, 2, clip),
             nprocs=2, join=True)
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert abs(saved["result"]["loss"] - ref_loss) <= 1e-5 * ref_loss
    assert_same_weights(saved["state"], ref_state)
