"""The log-prob kernels: the chunked autograd function against plain log_softmax (values and
gradients, float64 and float32), and the kept-positions path (only positions predicting a reply
token reach the LM head) against full logits."""

from __future__ import annotations

import torch

from align_helpers import pair_batch, random_pairs, tiny_llama
from panda.plugins.methods.preference import (keeps_logits_by_mask, labelled_row_logps,
                                              stacked_pairs)
from panda.plugins.methods.lm_loss import ChunkedTokenLogProbs
from panda.plugins.methods.token_logps import row_logps, token_logps


def test_chunked_logps_equal_log_softmax_in_float64_and_refuse_a_second_backward():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10, 5, -100, 1])
    upstream = torch.randn(7, dtype=torch.float64)
    ours = ChunkedTokenLogProbs.apply(logits, targets, 3, True)
    (ours * upstream).sum().backward(retain_graph=True)
    our_grad, logits.grad = logits.grad, None
    valid = targets != -100
    picked = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    theirs = torch.where(valid, picked, 0.0)
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)  # fp32 output
    # the log-probs are returned in fp32, so the incoming gradient is fp32 too
    torch.testing.assert_close(our_grad, logits.grad, rtol=1e-6, atol=1e-6)
    # the gradient buffer was scaled in place: a second backward must fail, not reuse it
    try:
        ours.sum().backward()
    except RuntimeError:
        pass
    else:
        raise AssertionError("a second backward through the same log-probs went through")


def test_chunked_logps_equal_log_softmax_with_small_chunks():
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :3] = -100
    labels[2, 6:] = -100
    ours = token_logps(logits, labels, chunk_elements=100)  # 2 rows per chunk
    ours.pow(2).sum().backward()
    our_grad, logits.grad = logits.grad, None
    full = torch.log_softmax(logits, dim=-1)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    theirs = torch.where(targets != -100,
                         full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    theirs.pow(2).sum().backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, logits.grad)


def test_only_positions_predicting_a_reply_token_reach_the_lm_head():
    model = tiny_llama(0)
    assert keeps_logits_by_mask(model)
    input_ids, labels = stacked_pairs(pair_batch(random_pairs(3, seed=4)))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    sums, counts = labelled_row_logps(model, input_ids, labels)
    hook.remove()
    assert seen == [(int((labels[:, 1:] != -100).sum()), model.config.vocab_size)]
    sums.sum().backward()
    kept_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_sums, full_counts = row_logps(model(input_ids=input_ids).logits, labels)
    full_sums.sum().backward()
    torch.testing.assert_close(sums, full_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, full_counts)
    for name, parameter in model.named_parameters():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(kept_grads[name], parameter.grad, rtol=1e-5,
                                   atol=1e-5 * scale, msg=name)
