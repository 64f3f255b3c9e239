"""Preference pairs (MedicalGPT's reward/DPO format) for pair methods such as dpo and rm.

``{"prompt" | "question", "chosen" | "response_chosen", "rejected" |
"response_rejected", "system"?, "history"?}``. The prompt (system, history and
question) is rendered with the chat template up to the assistant's turn; each
reply is the assistant's turn after it. Both sides share the prompt's tokens.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from panda.plugins.api import BadRecord, DatasetPlugin


class PreferenceRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(validation_alias=AliasChoices("prompt", "question"))
    chosen: str = Field(validation_alias=AliasChoices("chosen", "response_chosen"))
    rejected: str = Field(validation_alias=AliasChoices("rejected", "response_rejected"))
    system: Optional[str] = None
    history: list[tuple[str, str]] = []  # earlier (question, answer) turns


class Preference(DatasetPlugin):
    """Preference pairs {"prompt"|"question", "chosen"|"response_chosen",
    "rejected"|"response_rejected", "system"?, "history"?} for dpo/rm-style methods."""

    Record = PreferenceRecord
    data_format = "pair"

    def segments(self, record: dict[str, Any], ctx: Any) -> dict[str, list]:
        if record["chosen"] == record["rejected"]:
            raise BadRecord("chosen and rejected are the same reply: the pair expresses no "
                            "preference")
        messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
        for question, answer in record["history"]:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": record["prompt"]})
        prompts, replies = {}, {}
        for side in ("chosen", "rejected"):
            pieces = ctx.chat_segments(messages + [{"role": "assistant", "content": record[side]}])
            last = max(i for i, (_, trained) in enumerate(pieces) if trained)  # the reply
            prompts[side] = "".join(text for text, _ in pieces[:last])
            replies[side] = pieces[last:]
        if prompts["chosen"] != prompts["rejected"]:
            raise BadRecord("the chat template renders the prompt differently for the two replies")
        return {"prompt": [(prompts["chosen"], False)], **replies}
