"""The ``hf`` model plugin: any transformers causal LM, from a folder or a preset shape."""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from panda.models.presets import PRESETS
from panda.plugins.api import ModelPlugin, Options


class HFModelOptions(Options):
    path: Optional[str] = Field(None, description="Local Hugging Face model folder.")
    preset: Optional[str] = Field(None, description="Architecture shape, randomly initialised "
                                  "(the table below lists them).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the weights are loaded in (trainable weights are kept "
        "in fp32 when train.precision is bf16/fp16).")
    attn: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention implementation.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the "
                                    "model folder. Off unless you trust its source.")
    vocab_size: Optional[int] = Field(None, gt=0, description="Override the preset's vocabulary "
                                      "size (default: the tokenizer's when a preset is used).")

    @model_validator(mode="after")
    def _path_or_preset(self) -> "HFModelOptions":
        if (self.path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.path (a model folder) or model.preset "
                             "(an architecture shape)")
        if self.preset is not None and self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, PRESETS, n=2)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown preset '{self.preset}'{hint} Known: {', '.join(PRESETS)}")
        return self


class HFModel(ModelPlugin):
    """Any transformers AutoModelForCausalLM, from a local folder or a preset shape."""

    Options = HFModelOptions
    presets = PRESETS
