"""Sampling settings and the choice of the next token from the model's logits.

``temperature = 0`` means greedy decoding (argmax), which is what tests and
benchmarks use because it is deterministic. Otherwise the logits go through
repetition penalty, temperature, top-k and top-p (in the order transformers'
``generate`` applies them) and one token is drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from panda.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop. Defaults follow common chat settings."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9  # 1.0 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the text
    seed: int | None = None
    stop_at_eos: bool = True  # benchmarks turn it off to always decode max_new_tokens

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max-new-tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top-p", "must be in (0, 1]"),
            (self.top_k >= 0, "top-k", "must be >= 0 (0 means off)"),
            (self.repetition_penalty > 0, "repetition-penalty", "must be > 0 (1 means off)"),
        ]
        for ok, flag, rule in checks:
            if not ok:
                value = getattr(self, flag.replace("-", "_"))
                raise UsageError(f"--{flag} {rule} (got {value})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Sampling":
        """Build from keyword arguments, dropping the ones left as None (= default)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(kwargs) - known
        if unknown:
            raise UsageError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**{key: value for key, value in kwargs.items() if value is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_repetition_penalty(logits: "torch.Tensor", seen: "torch.Tensor", penalty: float
                             ) -> "torch.Tensor":
    """CTRL-style penalty (as transformers): divide positive, multiply negative logits of seen tokens.

    ``seen`` is a (batch, vocab) boolean mask of tokens in the prompt or output so far.
    """
    import torch

    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: "torch.Tensor", top_k: int) -> "torch.Tensor":
    import torch

    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def filter_top_p(logits: "torch.Tensor", top_p: float) -> "torch.Tensor":
    """Keep the smallest set of tokens whose probability adds up to ``top_p`` (nucleus)."""
    import torch

    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the best always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_next_tokens(logits: "torch.Tensor", sampling: Sampling, *, seen: "torch.Tensor | None" = None,
                     generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """One token id per row of ``logits`` (batch, vocab), as a (batch,) long tensor."""
    import torch

    logits = logits.float()
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    logits = filter_top_k(logits, sampling.top_k)
    logits = filter_top_p(logits, sampling.top_p)
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)
