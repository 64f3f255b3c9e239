"""``example-tiny``: a model plugin with its own presets, options and tokenizer.

Only pydantic and panda's plugin API are imported at module level: panda
imports this module to validate ``[model]`` options, and ``panda recipe
validate`` must not pay for torch or transformers. They are imported inside
``build`` and ``tokenizer``, which run only when a job trains.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from panda.plugins.api import ModelPlugin, Options

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

# Hugging Face config fields, as in a config.json; no weights (random init).
_TINY_LLAMA = dict(model_type="llama", vocab_size=320, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-5, tie_word_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "example-tiny-2l": {**_TINY_LLAMA, "hidden_size": 64, "num_hidden_layers": 2},
    "example-tiny-4l": {**_TINY_LLAMA, "hidden_size": 96, "num_hidden_layers": 4},
}


class ExampleTinyOptions(Options):
    preset: Literal["example-tiny-2l", "example-tiny-4l"] = Field(
        "example-tiny-2l", description="Architecture shape (see the presets table).")
    init_std: float = Field(0.02, gt=0, le=1, description="Standard deviation of the random "
                            "initial weights.")


class ExampleTiny(ModelPlugin):
    """A few-layer Llama with a byte-level tokenizer, built from nothing (no downloads)."""

    Options = ExampleTinyOptions
    presets = PRESETS

    def build(self, ctx: Any):
        from transformers import AutoConfig, AutoModelForCausalLM

        shape = dict(self.presets[self.options.preset])
        config = AutoConfig.for_model(shape.pop("model_type"),
                                      initializer_range=self.options.init_std, **shape)
        return AutoModelForCausalLM.from_config(config)

    def tokenizer(self, ctx: Any):
        return byte_tokenizer()


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus specials, so any UTF-8 text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
