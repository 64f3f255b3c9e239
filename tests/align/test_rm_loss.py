"""The reward model: the causal LM becomes a sequence classifier without copying its body, and
the pairwise loss and gradient equal a hand computation on each sequence alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from align_helpers import PAD, assert_same_grads, grads, pair_batch, random_pairs, tiny_llama
from panda.plugins.methods.rm import RewardModel

PAIRS = random_pairs(4, seed=21)
TOKENIZER = SimpleNamespace(pad_token_id=PAD)


def reward_model(margin: float = 0.0):
    method = RewardModel(RewardModel.Options(margin=margin))
    causal = tiny_llama(0)
    torch.manual_seed(3)
    return method, causal, method.prepare(causal, SimpleNamespace(tokenizer=TOKENIZER))


def test_prepare_moves_the_body_and_adds_a_scalar_head():
    _, causal, model = reward_model()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.model is causal.model  # the same modules: no second copy of the weights
    assert model.score.weight.shape == (1, causal.config.hidden_size)
    assert model.config.num_labels == 1 and model.config.pad_token_id == PAD
    assert not any(p.is_meta for p in model.parameters())
    assert 0 < model.score.weight.std().item() < 0.1  # initialised, not garbage


def hand_reward(model, prompt, reply) -> torch.Tensor:
    """The head on the last token's hidden state, the sequence alone and unpadded."""
    hidden = model.model(input_ids=torch.tensor([prompt + reply])).last_hidden_state
    return (hidden[0, -1] @ model.score.weight[0]).float()


def test_pairwise_loss_and_gradient_equal_a_hand_computation():
    method, _, model = reward_model(margin=0.5)
    total, count, metrics = method.loss(model, pair_batch(PAIRS))
    (total / count).backward()
    actual_grads = grads(model)

    _, _, reference = reward_model(margin=0.5)  # same seeds: same weights
    losses, chosen_scores, rejected_scores = [], [], []
    for prompt, chosen, rejected in PAIRS:
        r_w, r_l = hand_reward(reference, prompt, chosen), hand_reward(reference, prompt, rejected)
        losses.append(-torch.log(torch.sigmoid(r_w - r_l - 0.5)))
        chosen_scores.append(r_w.detach())
        rejected_scores.append(r_l.detach())
    loss = torch.stack(losses).mean()
    loss.backward()
    assert int(count) == len(PAIRS)
    assert math.isclose((total / count).item(), loss.item(), rel_tol=1e-5)
    assert_same_grads(actual_grads, grads(reference))
    chosen, rejected = torch.stack(chosen_scores), torch.stack(rejected_scores)
    assert metrics["rewards/accuracy"].item() == (chosen > rejected).float().mean().item()
    torch.testing.assert_close(metrics["rewards/margin"], (chosen - rejected).mean(),
                               rtol=1e-5, atol=1e-6)


def test_the_score_is_read_at_the_last_real_token_whatever_the_padding():
    """The same pair scores the same alone and beside a longer pair (more padding)."""
    method, _, model = reward_model()
    short = [(PAIRS[0][0], PAIRS[0][1][:1], PAIRS[0][2][:1])]
    with torch.no_grad():
        _, _, alone = method.loss(model, pair_batch(short))
        padded = pair_batch(short, pad_to=40)
        _, _, with_padding = method.loss(model, padded)
    torch.testing.assert_close(alone["rewards/chosen"], with_padding["rewards/chosen"])
    torch.testing.assert_close(alone["rewards/rejected"], with_padding["rewards/rejected"])
    expected = hand_reward(model, short[0][0], short[0][1])
    torch.testing.assert_close(alone["rewards/chosen"], expected, rtol=1e-5, atol=1e-6)


def test_loss_without_margin_is_the_bradley_terry_log_likelihood():
    method, _, model = reward_model()
    with torch.no_grad():
        total, count, metrics = method.loss(model, pair_batch(PAIRS))
        scores = [(hand_reward(model, p, c), hand_reward(model, p, r)) for p, c, r in PAIRS]
    expected = sum(F.softplus(r_l - r_w) for r_w, r_l in scores) / len(PAIRS)
    assert math.isclose((total / count).item(), expected.item(), rel_tol=1e-5)
