"""Prompts to token ids: the model's chat template when it has one, raw text otherwise.

A chat template already writes the special tokens the model expects (BOS,
role markers), so templated text is tokenized without adding more; raw text
gets the tokenizer's usual special tokens.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_for(prompt: str, system: str | None = None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def encode_messages(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a conversation, ending where the assistant's reply starts."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of raw text, with the tokenizer's own special tokens (e.g. BOS)."""
    return list(tokenizer(text)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str | None = None, *, messages: list[Message] | None = None,
                  system: str | None = None, chat_template: bool = True) -> list[int]:
    """Token ids for one request: ``prompt`` (+ ``system``) or a list of ``messages``.

    Without a template (the model has none, or ``chat_template=False``) the
    messages' contents are joined by blank lines and tokenized as raw text.
    """
    if messages is None:
        messages = messages_for(prompt or "", system)
    elif system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if chat_template and has_chat_template(tokenizer):
        return encode_messages(tokenizer, messages)
    return encode_text(tokenizer, "\n\n".join(m["content"] for m in messages))


def eos_token_ids(tokenizer: Any, model: Any | None = None) -> set[int]:
    """End-of-sequence ids: the generation config's (chat models often list several) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
