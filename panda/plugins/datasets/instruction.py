"""PandaLLM instruction data: ``{"input": ..., "target": ...}``, input masked out of the loss."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from panda.plugins.api import DatasetPlugin


class InstructionRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str
    target: str


class Instruction(DatasetPlugin):
    """PandaLLM instruction records {"input", "target"}; only the target is trained."""

    default_path = "dataset/instruction_tuning"
    Record = InstructionRecord

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        # PandaLLM feeds input and target as they are, with no template around them.
        return [(ctx.bos, False), (record["input"], False), (record["target"], True),
                (ctx.eos, True)]
