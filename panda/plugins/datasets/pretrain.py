"""PandaLLM pre-training data: ``{"title": ..., "content": ...}``, every token trained."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from panda.plugins.api import DatasetPlugin


class PretrainRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: str = ""
    content: str


class Pretrain(DatasetPlugin):
    """PandaLLM pre-training records {"title", "content"}: title and content as one document."""

    default_path = "dataset/pretraining"
    long_documents = "split"
    Record = PretrainRecord

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        text = f"{record['title']}\n{record['content']}" if record["title"] else record["content"]
        return [(ctx.bos, True), (text, True), (ctx.eos, True)]
