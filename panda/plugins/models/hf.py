"""The ``hf`` model plugin: any transformers causal LM, from a folder or a preset shape."""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from panda.errors import PandaError
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

    def __init__(self, options: Any = None):
        super().__init__(options)
        self._tokenizer: Any = None

    def tokenizer(self, ctx: Any) -> Any:
        """``tokenizer.path`` (default: ``model.path``), a tiny preset's own, with the recipe's template."""
        from panda.models import loading

        if self._tokenizer is None:
            options = self.options
            if options.path is not None:  # a wrong model.path is reported as such, first
                loading.check_model_folder(options.path, options.trust_remote_code)
            self._tokenizer = loading.load_tokenizer(
                ctx.tokenizer.path or options.path, preset=options.preset,
                trust_remote_code=options.trust_remote_code,
                chat_template=ctx.tokenizer.chat_template)
        return self._tokenizer

    def build(self, ctx: Any) -> Any:
        """The model: loaded from ``path``, or a ``preset`` shape initialised from ``run.seed``."""
        from panda.models import loading

        options = self.options
        if options.path is not None:
            loading.check_model_folder(options.path, options.trust_remote_code)
        tokenizer = self.tokenizer(ctx)
        if ctx.quant is not None:
            model = self._build_quantized(ctx, tokenizer)
        elif options.path is not None:
            model = loading.load_pretrained(options.path, dtype=options.dtype, attn=options.attn,
                                            trust_remote_code=options.trust_remote_code)
        else:
            model = loading.build_from_preset(PRESETS[options.preset],
                                              vocab_size=self._preset_vocab(tokenizer),
                                              dtype=options.dtype, attn=options.attn,
                                              seed=ctx.run.seed,
                                              special_tokens=special_tokens(tokenizer))
        return self._fitted(model, tokenizer, resize=ctx.quant is None)

    def build_empty(self, ctx: Any) -> Any:
        """``build``'s model on the meta device, without weights (none for [quant])."""
        from panda.models import loading

        if ctx.quant is not None:
            return None
        options = self.options
        tokenizer = self.tokenizer(ctx)
        if options.path is not None:
            config = loading.read_config(options.path, options.trust_remote_code)
        else:
            config = loading.preset_config(PRESETS[options.preset],
                                           vocab_size=self._preset_vocab(tokenizer),
                                           special_tokens=special_tokens(tokenizer))
        model = loading.build_empty(config, dtype=options.dtype, attn=options.attn,
                                    trust_remote_code=options.trust_remote_code)
        return self._fitted(model, tokenizer, resize=True)

    def _preset_vocab(self, tokenizer: Any) -> int:
        vocab_size = self.options.vocab_size or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise PandaError(f"model.vocab_size = {vocab_size} is smaller than the "
                             f"tokenizer's {len(tokenizer)} tokens",
                             hint="leave model.vocab_size unset to use the tokenizer's size")
        return vocab_size

    def _fitted(self, model: Any, tokenizer: Any, resize: bool) -> Any:
        """The tokenizer's size and pad id (a quantized embedding cannot be resized), and
        activation checkpointing when asked."""
        from panda.models import loading

        if resize:
            loading.fit_to_tokenizer(model, tokenizer)
        if self.options.gradient_checkpointing:
            loading.enable_activation_checkpointing(model)
        return model

    def _build_quantized(self, ctx: Any, tokenizer: Any) -> Any:
        """QLoRA's base: linear weights in 4/8 bits on this process's GPU.

        A folder is quantized shard by shard as it loads; a preset is built directly
        in low precision block by block (a 65B shape fits one 80 GB GPU)."""
        from panda import adapters
        from panda.models import loading

        options = self.options
        compute_dtype = adapters.compute_dtype_for(ctx.train.precision)
        if options.path is not None:
            return adapters.load_quantized_base(options.path, ctx.quant,
                                                compute_dtype=compute_dtype, attn=options.attn,
                                                trust_remote_code=options.trust_remote_code)
        config = loading.preset_config(PRESETS[options.preset],
                                       vocab_size=options.vocab_size or len(tokenizer),
                                       special_tokens=special_tokens(tokenizer))
        config._attn_implementation = options.attn
        return adapters.quantized_model_from_config(config, ctx.quant,
                                                    compute_dtype=compute_dtype)

    @classmethod
    def check_recipe(cls, options: HFModelOptions, recipe: Any) -> None:
        """Packing is only allowed with attention that keeps packed documents apart."""
        from panda import registry
        from panda.data import PACKING_ATTENTION

        if not recipe.data.packing:
            return
        if getattr(registry.get("method", recipe.method.name), "data_format", "lm") != "lm":
            return  # pair data is never packed
        if options.attn not in PACKING_ATTENTION:
            raise ValueError(
                f"attn = '{options.attn}' cannot keep packed documents apart; use one of "
                f"{', '.join(PACKING_ATTENTION)} or set data.packing = false")
        if options.trust_remote_code:
            raise ValueError(
                "packing with a model's own remote code: panda cannot tell whether its attention "
                "keeps packed documents apart; set data.packing = false")


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's bos, eos and pad ids, for a preset's config."""
    return {name: getattr(tokenizer, name, None)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
