"""``qa-pairs``: a dataset plugin for JSON Lines records ``{"q": ..., "a": ...}``.

The question becomes the prompt (masked out of the loss), the answer the
target. Bad records raise ``DataError`` starting with ``path:line`` so panda can
point the user at the exact line.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from pydantic import Field

from panda.errors import DataError
from panda.plugins.api import DatasetPlugin, Options

IGNORE_INDEX = -100  # label of tokens that carry no loss


class QaPairsOptions(Options):
    prompt_prefix: str = Field("Question: ", description="Text put before each question.")
    answer_prefix: str = Field("\nAnswer: ", description="Text between question and answer "
                               "(part of the prompt, so not trained).")
    max_answer_chars: int = Field(4096, gt=0, description="Answers longer than this are "
                                  "cut to this many characters.")


class QaPairs(DatasetPlugin):
    """Question/answer pairs {"q", "a"} in JSON Lines; only the answer is trained."""

    Options = QaPairsOptions

    def records(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                yield where, parse_record(line, where)

    def encode(self, record: dict[str, Any], tokenizer: Any, ctx: Any) -> dict[str, list[int]]:
        prompt = f"{self.options.prompt_prefix}{record['q']}{self.options.answer_prefix}"
        answer = record["a"][:self.options.max_answer_chars]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        answer_ids.append(tokenizer.eos_token_id)  # so the model learns where to stop
        return {"input_ids": prompt_ids + answer_ids,
                "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def parse_record(line: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with keys \"q\" and \"a\"")
    for key in ("q", "a"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: \"{key}\" must be a string (keys: {', '.join(record)})")
    return {"q": record["q"], "a": record["a"]}
