"""Language-modelling methods: ``pretrain`` (every token) and ``sft`` (responses only)."""

from __future__ import annotations

from pydantic import Field

from panda.plugins.api import MethodPlugin, Options


class LmOptions(Options):
    neftune_alpha: float = Field(0.0, ge=0, description="NEFTune noise scale on input "
                                 "embeddings during training; 0 = off (typical: 5).")


class Pretrain(MethodPlugin):
    """Causal language modelling on every token (title + content, plain text)."""

    Options = LmOptions


class Sft(MethodPlugin):
    """Supervised fine-tuning: loss on response tokens only (prompts are masked)."""

    Options = LmOptions
