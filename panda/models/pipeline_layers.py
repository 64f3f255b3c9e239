"""LLaMA-family causal LMs as a sequence of pipeline layers (DeepSpeed ``LayerSpec`` s).

A LLaMA, Mistral or Qwen2 model is cut into ``num_hidden_layers + 3`` layers::

    0          EmbeddingPipe     (input_ids, position_ids) -> (hidden, position_ids)
    1 .. L     DecoderLayerPipe  (hidden, position_ids)    -> (hidden, position_ids)
    L + 1      NormPipe          (hidden, position_ids)    -> hidden
    L + 2      LMHeadPipe        hidden                    -> logits
               (tied embeddings: the embedding module again, as a TiedLayerSpec)

Only tensors travel between stages, so every decoder layer recomputes what the
Hugging Face model computes once per forward pass: the rotary embeddings and
the attention mask, both from ``position_ids``. Carrying position_ids is what
keeps packed documents apart in a pipeline: transformers derives the
per-document mask from positions that restart at 0 (DESIGN section 6).

Layer ``i`` of the pipeline is file ``layer_{i:02d}-model_states.*`` of a
pipeline folder and of DeepSpeed's own pipeline checkpoints, with the same
keys; ``hf_key`` / ``layer_of_hf_key`` map those keys to and from the Hugging
Face names, so conversions are renames, never arithmetic.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# Architectures whose transformers modules are reused layer by layer.
FAMILIES: dict[str, tuple[str, str]] = {
    # model_type: (module, class name prefix)
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}
DECODER_TYPE = "DecoderLayerPipe"  # for DeepSpeed's partition_method "type:..."


def supported(model_type: str) -> bool:
    return model_type in FAMILIES


def family_class(config: Any, suffix: str) -> type:
    module_name, prefix = FAMILIES[config.model_type]
    return getattr(importlib.import_module(module_name), f"{prefix}{suffix}")


# -- layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where each part of a model sits in the pipeline's layer sequence."""

    num_decoders: int
    tied: bool

    @property
    def norm(self) -> int:
        return self.num_decoders + 1

    @property
    def head(self) -> int:
        return self.num_decoders + 2

    @property
    def num_layers(self) -> int:
        return self.num_decoders + 3

    def saved_layers(self) -> list[int]:
        """Layers with weights of their own (a tied head reuses layer 0's)."""
        return [i for i in range(self.num_layers) if not (self.tied and i == self.head)]

    @classmethod
    def of(cls, config: Any) -> "Layout":
        return cls(config.num_hidden_layers, bool(getattr(config, "tie_word_embeddings", False)))


def hf_key(layout: Layout, layer: int, key: str) -> str:
    """The Hugging Face name of ``key`` in pipeline layer ``layer``."""
    if layer == 0:
        return f"model.{key}"                             # embed_tokens.weight
    if layer <= layout.num_decoders:
        return f"model.layers.{layer - 1}.{key.removeprefix('layer.')}"
    if layer == layout.norm:
        return f"model.{key}"                             # norm.weight
    return key                                            # lm_head.weight


_DECODER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_of_hf_key(layout: Layout, name: str) -> tuple[int, str]:
    """(pipeline layer, key inside it) of a Hugging Face weight name."""
    match = _DECODER_KEY.match(name)
    if match:
        return int(match.group(1)) + 1, f"layer.{match.group(2)}"
    if name.startswith("model.embed_tokens."):
        return 0, name.removeprefix("model.")
    if name.startswith("model.norm."):
        return layout.norm, name.removeprefix("model.")
    if name.startswith("lm_head."):
        return layout.head, name
    raise KeyError(f"{name} is not a weight of a LLaMA-family causal LM")


# -- the layers -------------------------------------------------------------------------------

class EmbeddingPipe(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


class DecoderLayerPipe(nn.Module):
    """One decoder layer; rotary embeddings and mask are rebuilt here from position_ids."""

    def __init__(self, config: Any, index: int):
        super().__init__()
        self.config = config
        self.index = index
        self.layer = family_class(config, "DecoderLayer")(config, index)
        self.rotary = family_class(config, "RotaryEmbedding")(config)  # buffers only
        self.make_mask = _mask_function(config, index)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids = inputs
        mask = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                              position_ids=position_ids, **_no_cache_arguments(self.make_mask))
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=self.rotary(hidden, position_ids))
        return hidden, position_ids


@functools.cache  # one signature inspection per mask builder, not one per layer call
def _no_cache_arguments(make_mask: Callable[..., Any]) -> dict[str, None]:
    """The mask builders' "no KV cache" arguments: ``cache`` in newer transformers 5
    releases, ``past_key_values`` (and ``cache_position``) in earlier ones."""
    import inspect

    names = inspect.signature(make_mask).parameters
    return {name: None for name in ("cache", "past_key_values", "cache_position") if name in names}


def _mask_function(config: Any, index: int) -> Callable[..., Any]:
    """The mask the Hugging Face model gives layer ``index``: full causal or sliding window."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # qwen2 (and newer configs): per-layer attention kinds
        sliding = layer_types[index] == "sliding_attention"
    else:  # mistral: one window for every layer when set
        sliding = getattr(config, "sliding_window", None) is not None and \
            config.model_type == "mistral"
    return create_sliding_window_causal_mask if sliding else create_causal_mask


class NormPipe(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.norm = family_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.norm(inputs[0])


class LMHeadPipe(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def tied_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection of a model with tied embeddings: the embedding matrix again."""
    return nn.functional.linear(hidden, embedding.embed_tokens.weight)


def layer_specs(config: Any) -> list[Any]:
    """DeepSpeed LayerSpecs of the whole model; a stage builds only the ones it owns."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    layout = Layout.of(config)
    if layout.tied:
        embed = TiedLayerSpec("embed", EmbeddingPipe, config,
                              tied_weight_attr=["embed_tokens.weight"])
        head = TiedLayerSpec("embed", EmbeddingPipe, config, forward_fn=tied_head,
                             tied_weight_attr=["embed_tokens.weight"])
    else:
        embed, head = LayerSpec(EmbeddingPipe, config), LayerSpec(LMHeadPipe, config)
    decoders = [LayerSpec(DecoderLayerPipe, config, i) for i in range(layout.num_decoders)]
    return [embed, *decoders, LayerSpec(NormPipe, config), head]


# -- which layers a stage owns, and filling them --------------------------------------------

def local_layers(module: Any, stage: int, with_tied_copy: bool = True
                 ) -> list[tuple[int, nn.Module]]:
    """(pipeline layer index, module) of every layer with weights that this stage built.

    ``with_tied_copy``: include the last stage's copy of a tied embedding (layer 0).
    """
    start = module.partitions()[stage]
    found = [(start + offset, fn) for offset, fn in enumerate(module.forward_funcs)
             if isinstance(fn, nn.Module)]
    if with_tied_copy and not any(index == 0 for index, _ in found):
        # The last stage of a tied model holds the embedding only to project its outputs:
        # it carries layer 0's weights.
        found += [(0, tied) for tied in getattr(module, "tied_modules", {}).values()]
    return found


def initialise_layer(layer: nn.Module, index: int, config: Any, seed: int) -> None:
    """Random weights for a preset, as Hugging Face initialises them, seeded per layer so any
    partition into stages gives the same model."""
    generator = torch.Generator().manual_seed(int(seed) * 100003 + int(index))
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for sub in layer.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                sub.weight.copy_(torch.empty_like(sub.weight, device="cpu")
                                 .normal_(0.0, std, generator=generator))
                if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].zero_()
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif type(sub).__name__.endswith("RMSNorm"):
                sub.weight.fill_(1.0)
