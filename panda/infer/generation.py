"""Many prompts through one backend: batches by length, streamed chunks, completions.

Prompts of similar length share a batch so little compute goes to padding;
the longest batch runs first so an out-of-memory error shows up at once, not
after an hour. Backends built on ``panda.infer.decode`` stream ``Chunk``s
with finish reasons and token counts; a third-party backend that only
implements ``generate`` (``(index, piece)`` pairs) is wrapped so callers see
the same ``Chunk``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from panda.infer.sampling import Sampling

Prompt = str | list[int]  # raw text, or token ids already built (chat template applied)


@dataclass
class Chunk:
    """A piece of one prompt's output; the prompt's last chunk carries ``finish_reason``."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    pieces: list[str] = field(default_factory=list, repr=False)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest batch first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def backend_stream(backend: Any, prompts: Sequence[Prompt], sampling: Sampling) -> Iterator[Chunk]:
    """One batch through ``backend``: its own ``stream`` if it has one, else ``generate``."""
    if hasattr(backend, "stream"):
        yield from backend.stream(list(prompts), sampling)
        return
    for index, piece in backend.generate(list(prompts), **sampling.as_dict()):
        yield Chunk(index, piece)
    for index in range(len(prompts)):
        yield Chunk(index, "", finish_reason="unknown")


def stream_batches(backend: Any, prompts: Sequence[Prompt], sampling: Sampling, *,
                   batch_size: int = 8) -> Iterator[Chunk]:
    """Chunks of every prompt (indices into ``prompts``), batch after batch."""
    lengths = [len(p) for p in prompts]  # characters or tokens: both rank length well enough
    for batch in batches_by_length(lengths, batch_size):
        for chunk in backend_stream(backend, [prompts[i] for i in batch], sampling):
            yield Chunk(batch[chunk.index], chunk.text, chunk.finish_reason,
                        chunk.completion_tokens)


def complete(backend: Any, prompts: Sequence[Prompt], sampling: Sampling, *,
             batch_size: int = 8) -> list[Completion]:
    """Every prompt's whole completion, in the order of ``prompts``."""
    completions = [Completion(i, prompt_tokens=len(p) if not isinstance(p, str) else None)
                   for i, p in enumerate(prompts)]
    for _ in collect(stream_batches(backend, prompts, sampling, batch_size=batch_size),
                     completions):
        pass  # collect fills the completions in place
    return completions


def collect(chunks: Iterator[Chunk], completions: list[Completion]) -> Iterator[Completion]:
    """Accumulate chunks; yield each completion as soon as its last chunk arrives."""
    for chunk in chunks:
        completion = completions[chunk.index]
        completion.pieces.append(chunk.text)
        if chunk.last:
            completion.text = "".join(completion.pieces)
            completion.finish_reason = chunk.finish_reason
            completion.completion_tokens = chunk.completion_tokens
            yield completion
