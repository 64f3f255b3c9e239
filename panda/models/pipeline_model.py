"""The ``[model]`` of a recipe as a DeepSpeed PipelineModule holding one stage's layers.

The ``hf`` model plugin's options say what to build: ``path`` (a pipeline
folder or a Hugging Face safetensors folder, read one layer at a time) or
``preset`` (random weights, seeded per layer so the partition into stages
does not change the model), ``dtype`` and ``attn``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from panda.errors import PandaError


def pipeline_config(model_options: Any, tokenizer: Any) -> Any:
    """The transformers config of the model, with the attention implementation set."""
    from transformers import AutoConfig

    from panda.models.loading import check_attention, read_model_config
    from panda.models.pipeline_layers import supported
    from panda.models.presets import PRESETS

    check_attention(model_options.attn)
    if model_options.path is not None:
        read_model_config(model_options.path)  # a wrong path is reported as such
        config = AutoConfig.from_pretrained(model_options.path, trust_remote_code=False)
    else:
        fields = dict(PRESETS[model_options.preset])
        model_type = fields.pop("model_type")
        vocab_size = model_options.vocab_size or len(tokenizer)
        special = {name: getattr(tokenizer, name, None)
                   for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        fields.update({k: v for k, v in special.items() if v is not None})
        config = AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab_size})
    if not supported(config.model_type):
        raise PandaError(f"ds-pipeline supports llama, mistral and qwen2 models, not "
                         f"'{config.model_type}'")
    if len(tokenizer) > config.vocab_size:
        raise PandaError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                         f"has {config.vocab_size}",
                         hint="a pipeline cannot resize embeddings; resize them in the HF "
                         "folder first, or use a tokenizer of the model's size")
    config._attn_implementation = model_options.attn
    config.use_cache = False  # training: and packed documents need no cache to stay apart
    return config


def build_pipeline_module(model_plugin: Any, recipe: Any, *, num_stages: int, stage: int,
                          partition_method: str, activation_checkpoint_interval: int,
                          loss_fn: Any) -> Any:
    """This stage's part of the model, weights loaded (or initialised) layer by layer."""
    from deepspeed.pipe import PipelineModule

    from panda.models.loading import torch_dtype
    from panda.models.pipeline_layers import (DECODER_TYPE, Layout, initialise_layer,
                                              layer_specs, local_layers)
    from panda.models.pipeline_weights import open_weights

    options = model_plugin.options
    config = pipeline_config(options, model_plugin.tokenizer(recipe))
    # DeepSpeed prints its partition table from rank 0; panda's log is the place for news.
    with contextlib.redirect_stdout(io.StringIO()):
        module = PipelineModule(layers=layer_specs(config), num_stages=num_stages,
                                loss_fn=loss_fn, partition_method=partition_method,
                                activation_checkpoint_interval=activation_checkpoint_interval,
                                # Recompute decoder layers only: the embedding's inputs are token
                                # ids, through which reentrant checkpointing cannot backpropagate.
                                checkpointable_layers=[DECODER_TYPE],
                                dynamic_shape=True)  # sequence lengths vary per micro-batch
    weights = open_weights(options.path, Layout.of(config)) if options.path else None
    for index, layer in local_layers(module, stage):
        if weights is not None:
            layer.load_state_dict(weights.layer_state(index), strict=True)
        else:
            initialise_layer(layer, index, config, recipe.run.seed)
    module.to(torch_dtype(options.dtype))
    module.config = config  # for checkpoints' hf-meta and throughput figures
    module.matmul_parameter_count = whole_model_matmul_parameters(config)
    return module


def whole_model_matmul_parameters(config: Any) -> int:
    """What every stage together multiplies by: all weights but the input embedding lookup."""
    from panda.models.presets import parameter_count

    shape = {k: getattr(config, k, None) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")}
    embedding = config.vocab_size * config.hidden_size
    return parameter_count(shape) - (0 if config.tie_word_embeddings else embedding)
