"""Independent references for the alignment tests: a tiny Llama, hand-built pair batches, and
sequence log-probs computed the plain way, one sequence at a time, with an explicit loop.

Nothing here imports panda's method code: the tests compare panda against these.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from panda.models.presets import PRESETS

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parents[2]
PAD = 0  # never drawn by random_pairs, so a reward head can find the last real token
IGNORE = -100


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"})
    config._attn_implementation = "eager"
    config.pad_token_id = PAD
    return LlamaForCausalLM(config).float()


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every weight a little, as training would: policy != reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def random_pairs(count: int, seed: int = 0, vocab: int = 512) -> list[tuple[list[int], ...]]:
    """(prompt, chosen reply, rejected reply) token lists of varied lengths."""
    rng = random.Random(seed)

    def tokens(low: int, high: int) -> list[int]:
        return [rng.randrange(8, vocab) for _ in range(rng.randint(low, high))]

    return [(tokens(2, 9), tokens(1, 12), tokens(1, 12)) for _ in range(count)]


def pair_batch(pairs: list[tuple[list[int], ...]], pad_to: int | None = None
               ) -> dict[str, torch.Tensor]:
    """The pair batch contract (docs/data.md) built by hand: right padding, prompt unlabelled."""
    rows = {"chosen": [prompt + chosen for prompt, chosen, _ in pairs],
            "rejected": [prompt + rejected for prompt, _, rejected in pairs]}
    width = pad_to or max(len(r) for side in rows.values() for r in side)
    batch: dict[str, torch.Tensor] = {}
    for side, sequences in rows.items():
        ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, ((prompt, *_), sequence) in enumerate(zip(pairs, sequences)):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt):len(sequence)] = torch.tensor(sequence[len(prompt):])
            mask[row, :len(sequence)] = 1
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
        batch[f"{side}_attention_mask"] = mask
    batch["_num_pairs"] = torch.tensor(len(pairs))
    batch["_source"] = torch.zeros(len(pairs), dtype=torch.long)
    batch["_row"] = torch.arange(len(pairs))
    return batch


def sequence_logp(model: Any, prompt: list[int], reply: list[int]) -> tuple[torch.Tensor, int]:
    """(sum of log p(reply token | everything before it), reply length): one unpadded sequence,
    a plain forward, log_softmax, and a loop over the reply's positions."""
    ids = torch.tensor([prompt + reply])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = torch.zeros(())
    for offset, token in enumerate(reply):
        position = len(prompt) + offset  # where the token sits; predicted one step earlier
        total = total + log_probs[position - 1, token]
    return total, len(reply)


def pair_logps(model: Any, pairs) -> dict[str, torch.Tensor]:
    """Per pair: summed and averaged log-probs of each reply (lists -> [B] tensors)."""
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    for prompt, chosen, rejected in pairs:
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            total, length = sequence_logp(model, prompt, reply)
            out[side].append(total)
            out[f"{side}_len"].append(length)
    result = {side: torch.stack(out[side]) for side in ("chosen", "rejected")}
    for side in ("chosen", "rejected"):
        result[f"{side}_len"] = torch.tensor(out[f"{side}_len"], dtype=torch.float32)
        result[f"{side}_avg"] = result[side] / result[f"{side}_len"]
    return result


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(actual: dict, expected: dict, rtol: float = 1e-5):
    """Equal within rtol of each tensor's largest entry: fp32 sums taken in another order
    (a padded batch vs one sequence at a time) differ by rounding, about 1e-7 of the scale."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale,
                                   msg=name)


def job_context(lora: Any = None) -> SimpleNamespace:
    """What ``method.prepare(model, ctx)`` reads from the job: the recipe's [lora]."""
    return SimpleNamespace(recipe=SimpleNamespace(lora=lora))


def panda_train(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    """`panda train RECIPE ...` through the real CLI; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "PANDA_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "panda", "train", str(recipe), *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def curve(out: Path, key: str) -> list[float]:
    """One metric's values, step by step, from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]
