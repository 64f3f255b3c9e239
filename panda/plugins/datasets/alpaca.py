"""Stanford Alpaca data: ``{"instruction", "input", "output"}`` (optional system, history)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from panda.plugins.api import DatasetPlugin


class AlpacaRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instruction: str
    input: str = ""
    output: str
    system: Optional[str] = None
    history: list[tuple[str, str]] = []  # earlier (instruction, output) turns


class Alpaca(DatasetPlugin):
    """Alpaca records {"instruction", "input", "output"}, rendered with the chat template;
    only the output (and earlier outputs in history) are trained."""

    Record = AlpacaRecord

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
        for question, answer in record["history"]:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        prompt = record["instruction"]
        if record["input"]:
            prompt = f"{prompt}\n{record['input']}"
        messages += [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": record["output"]}]
        return ctx.chat_segments(messages)
