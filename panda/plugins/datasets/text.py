"""Plain ``.txt`` files: one document per file, or per block of lines between blank lines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from panda.data.readers import read_text_documents
from panda.plugins.api import DatasetPlugin, Options


class TextOptions(Options):
    document: Literal["file", "paragraph"] = Field(
        "file", description="What one document is: a whole file, or each block of lines "
        "separated by a blank line.")


class Text(DatasetPlugin):
    """Plain text files (.txt), every token trained; long documents are split."""

    Options = TextOptions
    extensions = (".txt",)
    long_documents = "split"

    def records(self, path: str):
        return read_text_documents(path, per="file" if self.options.document == "file"
                                   else "paragraph")

    def segments(self, record: dict[str, Any], ctx: Any) -> list:
        return [(ctx.bos, True), (record["text"], True), (ctx.eos, True)]
