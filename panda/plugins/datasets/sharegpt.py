"""ShareGPT conversations (MedicalGPT's SFT format): ``{"conversations": [{"from", "value"}]}``."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from panda.plugins.api import BadRecord, DatasetPlugin

ROLE_OF = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
           "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    speaker: str = Field(alias="from")
    value: str


class ShareGptRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    conversations: list[Turn] = Field(min_length=1)
    system: Optional[str] = None


class ShareGpt(DatasetPlugin):
    """ShareGPT records {"conversations": [{"from": "human"|"gpt"|"system", "value"}]},
    rendered with the chat template; only the gpt turns are trained."""

    Record = ShareGptRecord

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
        for number, turn in enumerate(record["conversations"]):
            role = ROLE_OF.get(turn["speaker"].lower())
            if role is None:
                raise BadRecord(f"conversations[{number}]: unknown speaker '{turn['speaker']}' "
                                f"(expected human, gpt or system)")
            messages.append({"role": role, "content": turn["value"]})
        return ctx.chat_segments(messages)
