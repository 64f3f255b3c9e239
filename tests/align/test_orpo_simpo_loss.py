"""ORPO's and SimPO's loss and gradient equal an independent reference: length-averaged log-probs
from a plain forward of each sequence alone (explicit loop), the papers' formulas, and TRL's
loss functions on the same log-probs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align_helpers import (assert_same_grads, grads, pair_batch, pair_logps, perturb,
                           random_pairs, tiny_llama)
from panda.plugins.methods.orpo import Orpo
from panda.plugins.methods.simpo import SimPO

PAIRS = random_pairs(4, seed=11)


def panda_loss(method, pairs=PAIRS):
    policy = tiny_llama(0)
    perturb(policy)
    total, count, metrics = method.loss(policy, pair_batch(pairs))
    (total / count).backward()
    return (total / count).item(), int(count), metrics, grads(policy)


def reference_policy_logps(pairs=PAIRS):
    policy = tiny_llama(0)
    perturb(policy)
    return policy, pair_logps(policy, pairs)


def orpo_reference(beta: float, pairs=PAIRS):
    """Hong et al. 2024, Eqs. 2-7, per pair, then the mean over pairs."""
    policy, logps = reference_policy_logps(pairs)
    losses = []
    for i in range(len(pairs)):
        p_w, p_l = logps["chosen_avg"][i].exp(), logps["rejected_avg"][i].exp()
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        nll = -logps["chosen"][i] / logps["chosen_len"][i]  # mean NLL over chosen tokens
        losses.append(nll - beta * torch.log(torch.sigmoid(torch.log(odds_w / odds_l))))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), logps, grads(policy)


def simpo_reference(beta: float, gamma: float, eps: float, pairs=PAIRS):
    """Meng et al. 2024, Eq. 6 (with cDPO-style label smoothing), per pair."""
    policy, logps = reference_policy_logps(pairs)
    losses = []
    for i in range(len(pairs)):
        z = beta * logps["chosen_avg"][i] - beta * logps["rejected_avg"][i] - gamma
        losses.append(-(1 - eps) * torch.log(torch.sigmoid(z))
                      - eps * torch.log(torch.sigmoid(-z)))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), logps, grads(policy)


def test_orpo_loss_and_gradient_equal_the_papers_formula():
    loss, count, metrics, panda_grads = panda_loss(Orpo(Orpo.Options(beta=0.25)))
    expected, logps, expected_grads = orpo_reference(0.25)
    assert count == len(PAIRS)
    assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)
    assert_same_grads(panda_grads, expected_grads)
    torch.testing.assert_close(metrics["nll"], -logps["chosen_avg"].mean().detach(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["rewards/chosen"], 0.25 * logps["chosen_avg"].mean(),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("gamma,eps", [(1.0, 0.0), (0.4, 0.1)])
def test_simpo_loss_and_gradient_equal_the_papers_formula(gamma, eps):
    method = SimPO(SimPO.Options(beta=2.0, gamma=gamma, label_smoothing=eps))
    loss, count, metrics, panda_grads = panda_loss(method)
    expected, logps, expected_grads = simpo_reference(2.0, gamma, eps)
    assert count == len(PAIRS)
    assert math.isclose(loss, expected, rel_tol=1e-5), (loss, expected)
    assert_same_grads(panda_grads, expected_grads)
    margin = 2.0 * (logps["chosen_avg"] - logps["rejected_avg"])
    torch.testing.assert_close(metrics["rewards/margin"], margin.mean().detach(),
                               rtol=1e-5, atol=1e-6)
    assert metrics["rewards/accuracy"].item() == (margin > 0).float().mean().item()


def test_a_padding_pair_gives_finite_zero_loss_and_gradient():
    for method in (Orpo(Orpo.Options()), SimPO(SimPO.Options())):
        policy = tiny_llama(0)
        batch = pair_batch(PAIRS[:1])
        batch["chosen_labels"][:] = -100  # the padding pair: no labelled token at all
        batch["rejected_labels"][:] = -100
        batch["_num_pairs"] = torch.tensor(0)
        total, count, _ = method.loss(policy, batch)
        total.backward()
        assert total.item() == 0.0 and int(count) == 0
        assert all(torch.isfinite(p.grad).all() and not p.grad.any()
                   for p in policy.parameters() if p.grad is not None)


# -- TRL ------------------------------------------------------------------------------------

def test_orpo_odds_ratio_term_equals_trls():
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer",
                                   reason="trl is not installed")
    policy, logps = reference_policy_logps()
    chosen, rejected = logps["chosen_avg"].detach(), logps["rejected_avg"].detach()
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    loss, _, metrics, _ = panda_loss(Orpo(Orpo.Options(beta=0.25)))
    # panda: mean(nll - beta * log sigmoid(log odds)); TRL's losses are beta * log sigmoid(...)
    odds_ratio_part = loss - metrics["nll"].item()
    assert math.isclose(odds_ratio_part, -trl_losses.mean().item(), rel_tol=1e-5)


def test_orpo_whole_loss_equals_trls_for_one_pair():
    """With one pair per batch TRL's token-mean NLL is the per-pair mean, so the whole loss
    (NLL + odds-ratio term) must match."""
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer",
                                   reason="trl is not installed")
    pair = PAIRS[:1]
    _, logps = reference_policy_logps(pair)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(fake, logps["chosen_avg"].detach(),
                                                      logps["rejected_avg"].detach())
    trl_nll = -(logps["chosen"] / logps["chosen_len"]).detach()  # cross entropy, token mean
    trl_loss = (trl_nll - losses).mean().item()
    loss, *_ = panda_loss(Orpo(Orpo.Options(beta=0.1)), pair)
    assert math.isclose(loss, trl_loss, rel_tol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_equals_trls_cpo_simpo(eps):
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer",
                                  reason="trl is not installed")
    _, logps = reference_policy_logps()
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.8,
                           label_smoothing=eps, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, chosen_rewards, _ = trl_cpo.CPOTrainer.cpo_loss(
        fake, logps["chosen_avg"].detach(), logps["rejected_avg"].detach())
    loss, _, metrics, _ = panda_loss(SimPO(SimPO.Options(beta=2.0, gamma=0.8,
                                                         label_smoothing=eps)))
    assert math.isclose(loss, trl_losses.mean().item(), rel_tol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), rtol=1e-5,
                               atol=0)
