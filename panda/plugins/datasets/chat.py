"""OpenAI-style chat data: ``{"messages": [{"role", "content"}, ...]}``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from panda.plugins.api import DatasetPlugin


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)


class Chat(DatasetPlugin):
    """Chat records {"messages": [{"role", "content"}]}, rendered with the tokenizer's chat
    template; only assistant turns are trained."""

    Record = ChatRecord

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        return ctx.chat_segments(record["messages"])
