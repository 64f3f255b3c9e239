"""A conversation with a model: history, system message, streamed replies.

The whole history is sent each turn (through the chat template). When it no
longer fits the context window next to ``max_new_tokens``, the oldest turns
are dropped -- the system message always stays.
"""

from __future__ import annotations

from typing import Any, Iterator

from panda.infer.generation import Completion, stream_batches
from panda.infer.prompting import Message, encode_prompt
from panda.infer.sampling import Sampling


class ChatSession:
    """History plus the backend that answers; ``reply`` streams one answer and records it."""

    def __init__(self, backend: Any, sampling: Sampling, *, system: str | None = None,
                 chat_template: bool = True):
        self.backend = backend
        self.sampling = sampling
        self.system = system
        self.chat_template = chat_template
        self.history: list[Message] = []  # user and assistant turns, oldest first
        self.last: Completion | None = None

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def prompt_ids(self, user_text: str) -> list[int]:
        """The conversation plus ``user_text``, oldest turns dropped until it fits."""
        turns = self.history + [{"role": "user", "content": user_text}]
        limit = getattr(self.backend, "context_length", None)
        while True:
            ids = encode_prompt(self.backend.tokenizer, messages=turns, system=self.system,
                                chat_template=self.chat_template)
            fits = limit is None or len(ids) + self.sampling.max_new_tokens <= limit
            if fits or len(turns) <= 1:
                return ids
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop one user/assistant pair

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to ``user_text``; it joins the history once complete."""
        ids = self.prompt_ids(user_text)
        pieces: list[str] = []
        self.last = Completion(0, prompt_tokens=len(ids))
        for chunk in stream_batches(self.backend, [ids], self.sampling, batch_size=1):
            if chunk.text:
                pieces.append(chunk.text)
                yield chunk.text
            if chunk.last:
                self.last.finish_reason = chunk.finish_reason
                self.last.completion_tokens = chunk.completion_tokens
        self.last.text = "".join(pieces)
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": self.last.text}]
