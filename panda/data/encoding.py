"""From rendered pieces to token ids and loss masks, many records per tokenizer call.

Plugins render a record as pieces ``(text or ids, trained)``. Tokenizing the
texts of thousands of pieces in one call of the Rust tokenizer uses every core
and avoids per-call overhead: that is what keeps ``panda data prepare`` close
to a raw ``tokenizer(texts)`` call. Pieces are tokenized separately (as
LLaMA-Factory does), so a prompt and its reply never merge into one token.

A tokenized example here is ``(ids, mask)``: two equal-length lists, mask 1
where the token carries loss. Labels (``-100`` where mask is 0) are made when
batches are built, after packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from panda.data.chat import ChatRenderer
from panda.plugins.api import BadRecord

Example = tuple[list[int], list[int]]  # (ids, mask)


@dataclass
class EncodeContext:
    """What a dataset plugin may use while rendering and encoding records."""

    tokenizer: Any
    max_seq_length: int
    chat_template: str
    method: str = "sft"
    bos: list[int] = field(default_factory=list)  # [bos_id] if the tokenizer adds one, else []
    eos: list[int] = field(default_factory=list)
    _encode_texts: Any = field(default=None, repr=False)
    _chat: Any = field(default=None, repr=False)

    @classmethod
    def create(cls, tokenizer: Any, *, max_seq_length: int, chat_template: str,
               method: str = "sft") -> "EncodeContext":
        probe = tokenizer("a")["input_ids"]
        bos_id = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        eos_id = getattr(tokenizer, "eos_token_id", None)
        return cls(tokenizer, max_seq_length, chat_template, method,
                   bos=[bos_id] if adds_bos else [], eos=[eos_id] if eos_id is not None else [],
                   _encode_texts=fast_text_encoder(tokenizer))

    def chat_segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, trained) pieces of a conversation rendered with the chat template."""
        if self._chat is None:
            self._chat = ChatRenderer(self.tokenizer, self.chat_template)
        return self._chat.segments(messages)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added."""
        return self._encode_texts(texts)

    def encode_segments(self, rendered: list[Any]) -> list[dict[str, list[int]]]:
        """Token lists (``input_ids``/``labels``, or the pair keys) of rendered records."""
        examples = encode_pieces(self, rendered)
        return [_as_token_lists(example) for example in examples]


def fast_text_encoder(tokenizer: Any):
    """A batched ``texts -> ids`` function: the Rust tokenizer directly when that is exact.

    transformers' wrapper adds per-call Python work; its backend gives the same
    ids faster. The two are compared on a probe so a tokenizer with Python-side
    preprocessing silently keeps the (slower, exact) wrapper.
    """
    def through_wrapper(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch",
                                                                         None)
    if encode_batch is None:
        return through_wrapper

    def through_backend(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)] if texts else []

    probe = ["Hello world, 1 2 3.", " leading space", "大熊猫是中国的国宝。", "a\n\nb\tc", ""]
    return through_backend if through_backend(probe) == through_wrapper(probe) else through_wrapper


def encode_pieces(ctx: EncodeContext, rendered: list[Any]) -> list[Any]:
    """Tokenize the pieces of many rendered records at once.

    ``rendered[i]`` is a list of pieces (an ``lm`` record) or a dict of such
    lists (a ``pair`` record); the result has the same shape with each list of
    pieces replaced by one ``(ids, mask)`` example.
    """
    texts: list[str] = []
    for record in rendered:
        for pieces in _piece_lists(record):
            texts.extend(text for text, _ in pieces if isinstance(text, str))
    ids_of_texts = iter(ctx.tokenize(texts))

    def join(pieces: list[tuple[Any, bool]]) -> Example:
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in pieces:
            piece = next(ids_of_texts) if isinstance(text, str) else list(text)
            ids.extend(piece)
            mask.extend([1 if trained else 0] * len(piece))
        return ids, mask

    out = []
    for record in rendered:
        if isinstance(record, dict):
            out.append({key: join(pieces) for key, pieces in record.items()})
        else:
            out.append(join(record))
    return out


def _piece_lists(record: Any) -> list[list[tuple[Any, bool]]]:
    if isinstance(record, dict):
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise TypeError(f"a pair record renders prompt, chosen and rejected; missing {missing}")
        return [record["prompt"], record["chosen"], record["rejected"]]
    return [record]


def _as_token_lists(example: Any) -> dict[str, list[int]]:
    if isinstance(example, dict):
        prompt_ids, _ = example["prompt"]
        out = {}
        for side in ("chosen", "rejected"):
            ids, mask = example[side]
            out[f"{side}_input_ids"] = prompt_ids + ids
            out[f"{side}_labels"] = [-100] * len(prompt_ids) + [t if m else -100
                                                               for t, m in zip(ids, mask)]
        return out
    ids, mask = example
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}


def from_token_lists(encoded: dict[str, list[int]]) -> Any:
    """The inverse of ``_as_token_lists`` for plugins that override ``encode``."""
    def example(ids: list[int], labels: list[int]) -> Example:
        if len(ids) != len(labels):
            raise BadRecord(f"plugin returned {len(ids)} input_ids but {len(labels)} labels")
        return list(ids), [0 if label == -100 else 1 for label in labels]

    if "chosen_input_ids" in encoded:  # the prompt stays inside each side
        pair = {side: example(encoded[f"{side}_input_ids"], encoded[f"{side}_labels"])
                for side in ("chosen", "rejected")}
        return {"prompt": ([], []), **pair}
    return example(encoded["input_ids"], encoded["labels"])


# -- fitting examples into max_seq_length ---------------------------------------------------

@dataclass
class FitCounts:
    truncated: int = 0  # examples cut to max_seq_length
    split: int = 0  # long documents cut into several
    no_target: int = 0  # dropped: no token left that carries loss


def fit_example(example: Example, max_len: int, long_documents: str, counts: FitCounts
                ) -> list[Example]:
    """The example cut to ``max_len``: split into pieces, or truncated; [] if nothing to learn.

    The first token of a packed document never carries loss (nothing in the
    document predicts it), so an example needs a trained token after its first.
    """
    ids, mask = example
    if len(ids) > max_len:
        if long_documents == "split":
            counts.split += 1
            pieces = [(ids[i:i + max_len], mask[i:i + max_len]) for i in range(0, len(ids), max_len)]
        else:
            counts.truncated += 1
            pieces = [(ids[:max_len], mask[:max_len])]
    else:
        pieces = [(ids, mask)]
    kept = [(i, m) for i, m in pieces if any(m[1:])]
    if not kept:
        counts.no_target += 1
    return kept


def fit_pair(example: dict[str, Example], max_len: int, counts: FitCounts
             ) -> dict[str, Example] | None:
    """Truncate a preference pair so prompt + each reply fits; None if a reply is left empty.

    The prompt gives way first: it keeps its end (the question nearest the reply),
    only as much as the longer reply needs, but never less than half the budget
    (or its whole length, if shorter). Only then are the replies cut at their end.
    """
    prompt, _ = example["prompt"]
    chosen, chosen_mask = example["chosen"]
    rejected, rejected_mask = example["rejected"]
    longest_reply = max(len(chosen), len(rejected))
    if len(prompt) + longest_reply <= max_len:
        return example
    counts.truncated += 1
    keep = min(len(prompt), max(max_len - longest_reply, max_len // 2))
    prompt = prompt[len(prompt) - keep:]
    room = max_len - len(prompt)
    chosen, chosen_mask = chosen[:room], chosen_mask[:room]
    rejected, rejected_mask = rejected[:room], rejected_mask[:room]
    if not any(chosen_mask) or not any(rejected_mask):
        counts.no_target += 1
        return None
    return {"prompt": (prompt, [0] * len(prompt)), "chosen": (chosen, chosen_mask),
            "rejected": (rejected, rejected_mask)}


def join_pair(example: dict[str, Example]) -> dict[str, Example]:
    """``{"chosen": prompt + chosen, "rejected": prompt + rejected}``, prompt untrained."""
    prompt, _ = example["prompt"]
    return {side: (prompt + example[side][0], [0] * len(prompt) + example[side][1])
            for side in ("chosen", "rejected")}
