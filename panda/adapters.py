"""LoRA and QLoRA: adapters on a model (peft), a 4/8-bit base (bitsandbytes), saving.

The training loop uses these in this order::

    model = load_quantized_base(path, recipe.quant, compute_dtype=...)   # QLoRA only
    model.gradient_checkpointing_enable()                                # if asked
    model = apply_lora(model, recipe.lora, recipe.quant)                 # peft model
    ...train...
    save_adapter(model, out_dir)                                         # peft adapter folder

Folding an adapter into full weights is :mod:`panda.lora_merge` (``panda merge-lora``).
``lora_recipe_problems`` rejects at validation the combinations that cannot work;
this module imports no torch, peft or transformers at import time, because the
recipe validator imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from panda.errors import PandaError, require

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig

    from panda.recipe_schema import LoraSection, QuantSection, Recipe

# Backends that cannot carry a LoRA model: a pipeline-parallel model is built from
# layer specs that peft cannot wrap, and FairScale's sharded wrappers predate
# frozen-base training. Third-party backends are trusted to say so themselves.
LORA_UNSUPPORTED_BACKENDS = {"ds-pipeline", "fairscale"}
# bitsandbytes weights (Params4bit / Int8Params) cannot be sharded by panda's FSDP2
# backend or partitioned by DeepSpeed ZeRO: each rank keeps the whole quantized base.
QUANT_BACKENDS = {"auto", "single", "ddp"}
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# -- recipe checks (no heavy imports) ---------------------------------------------------------

def lora_recipe_problems(recipe: "Recipe") -> list[tuple[tuple, str]]:
    """(key path, message) for each [lora]/[quant] setting that cannot work with the rest
    of the recipe. Called by the recipe validator; see docs/lora.md for the reasons."""
    problems: list[tuple[tuple, str]] = []
    lora, quant, backend = recipe.lora, recipe.quant, recipe.backend.name
    if lora is not None and backend in LORA_UNSUPPORTED_BACKENDS:
        problems.append((("backend", "name"), f"[lora] does not work with backend '{backend}'; "
                         "use single, ddp, fsdp or deepspeed (see docs/lora.md)"))
    if lora is not None and isinstance(lora.target_modules, list) and not lora.target_modules:
        problems.append((("lora", "target_modules"), "is empty: name the modules to adapt, or "
                         "use \"all-linear\""))
    if quant is not None and backend not in QUANT_BACKENDS:
        problems.append((("quant",), f"[quant] (QLoRA) works with the single and ddp backends, "
                         f"not '{backend}': bitsandbytes weights cannot be sharded or "
                         "partitioned by it; drop [quant] or use backend single/ddp "
                         "(see docs/lora.md)"))
    if quant is not None and quant.bits == 8:
        for key in ("type", "double_quant"):
            if key in quant.model_fields_set:
                problems.append((("quant", key), "applies to 4-bit quantization only; remove it "
                                 "or set quant.bits = 4"))
    return problems


# -- target modules ---------------------------------------------------------------------------

def block_prefixes(model: "torch.nn.Module") -> list[str]:
    """Names of the model's transformer blocks (``model.layers.0``, ...).

    Blocks are the classes a transformers model lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ...); without that list, the entries of the longest
    ``ModuleList``.
    """
    import torch

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [name for name, module in model.named_modules()
             if name and type(module).__name__ in block_classes]
    if found:
        return found
    lists = [(len(m), name) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise PandaError(f"cannot find the transformer blocks of {type(model).__name__} to put "
                         "LoRA on", hint="name the modules in lora.target_modules")
    _, name = max(lists)
    return [f"{name}.{index}" if name else str(index) for index in range(max(lists)[0])]


def resolve_target_modules(model: "torch.nn.Module",
                           target_modules: Union[list[str], str]) -> list[str]:
    """The module names to give peft. ``"all-linear"`` means every linear layer inside
    the transformer blocks (so never ``lm_head`` or other heads): their short names
    (``q_proj``, ``down_proj``, ...), or full paths when a short name would also
    select a linear layer outside the blocks. A list is checked against the model."""
    import torch

    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    if target_modules != "all-linear":
        names = [name for name, _ in model.named_modules()]
        for wanted in target_modules:
            if not any(n == wanted or n.endswith("." + wanted) for n in names):
                short = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise PandaError(f"lora.target_modules: no module named '{wanted}' in "
                                 f"{type(model).__name__}; its linear layers are "
                                 f"{', '.join(short)}")
        return list(target_modules)
    blocks = tuple(prefix + "." for prefix in block_prefixes(model))
    inside = [name for name in linears if name.startswith(blocks)]
    if not inside:
        raise PandaError(f"{type(model).__name__} has no linear layers in its blocks for "
                         "lora.target_modules = \"all-linear\"",
                         hint="name the modules in lora.target_modules")
    short = sorted({name.rsplit(".", 1)[-1] for name in inside})
    outside = [name for name in linears if not name.startswith(blocks)
               and name.rsplit(".", 1)[-1] in short]
    return sorted(inside) if outside else short


def lora_config(lora: "LoraSection", target_modules: list[str]) -> "LoraConfig":
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=target_modules,
                      modules_to_save=list(lora.modules_to_save) or None,
                      bias="none", task_type="CAUSAL_LM")


# -- LoRA on a model --------------------------------------------------------------------------

def apply_lora(model: "torch.nn.Module", lora: "LoraSection",
               quant: "QuantSection | None" = None) -> "PeftModel":
    """Freeze ``model`` and put LoRA adapters on it; returns the peft model.

    With ``quant`` the model must already be quantized (:func:`load_quantized_base`
    or :func:`quantized_model_from_config`); it is prepared for k-bit training
    first (:func:`prepare_quantized_base`). Enable gradient checkpointing before
    this call. Trainable weights (adapters, ``modules_to_save`` copies) are kept in
    float32 whatever the base's dtype, so run 16-bit bases under autocast.
    """
    import torch
    from peft import get_peft_model

    if quant is not None:
        if not is_quantized(model):
            raise PandaError("[quant] is set but the model is not quantized",
                             hint="load it with panda.adapters.load_quantized_base")
        prepare_quantized_base(model)
    targets = resolve_target_modules(model, lora.target_modules)
    peft_model = get_peft_model(model, lora_config(lora, targets))
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    if checkpointing_on(model):
        # Frozen embeddings give checkpointed blocks inputs that need no grad; with
        # reentrant checkpointing no gradient would reach the adapters inside.
        model.enable_input_require_grads()
    return peft_model


def save_adapter(model: "PeftModel", out_dir: str | os.PathLike, *,
                 state_dict: dict[str, "torch.Tensor"] | None = None,
                 is_main_process: bool = True, tokenizer: Any = None) -> Path:
    """Write a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base, out_dir)`` loads as is.

    Sharded backends pass the gathered adapter ``state_dict`` (peft's keys, as
    ``get_peft_model_state_dict`` returns them) and ``is_main_process``. Embedding
    layers are never saved implicitly: put resized ``embed_tokens`` / ``lm_head`` in
    ``lora.modules_to_save`` (saving them otherwise asks the Hub about the base).
    """
    out = Path(out_dir)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=state_dict, is_main_process=is_main_process,
                          safe_serialization=True, save_embedding_layers=False)
    if tokenizer is not None and is_main_process:
        tokenizer.save_pretrained(str(out))
    return out


def load_adapter_weights(model: "PeftModel", adapter_dir: str | os.PathLike) -> None:
    """Load a saved adapter's weights into a peft model built with the same [lora]
    (resuming training). Raises if a saved tensor has no place in the model."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter_dir), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise PandaError(f"adapter {adapter_dir} does not fit this model: '{unexpected[0]}' "
                         "has no place in it", hint="was it trained with the same [lora]?")


# -- QLoRA: the quantized base ----------------------------------------------------------------

def compute_dtype_for(precision: str) -> "torch.dtype":
    """The dtype bitsandbytes computes in for a ``train.precision``."""
    import torch

    return getattr(torch, PRECISION_DTYPES[precision])


def quantization_config(quant: "QuantSection", compute_dtype: "torch.dtype | str"
                        ) -> "BitsAndBytesConfig":
    """transformers' BitsAndBytesConfig for ``[quant]``: 4-bit nf4/fp4 (optionally
    double-quantized) or 8-bit (LLM.int8), computing in ``compute_dtype``."""
    import torch
    from transformers import BitsAndBytesConfig

    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def _require_bitsandbytes():
    return require("bitsandbytes", what="[quant]", package="bitsandbytes", extra="quant")


def load_quantized_base(path: str | os.PathLike, quant: "QuantSection", *,
                        compute_dtype: "torch.dtype", device: Any = None,
                        attn: str | None = None, trust_remote_code: bool = False
                        ) -> "torch.nn.Module":
    """Load a Hugging Face checkpoint with its linear layers quantized on the GPU.

    transformers reads the safetensors shards one by one and quantizes each
    weight as it is moved to the GPU, so host memory stays near one shard.
    """
    import torch

    _require_bitsandbytes()
    from transformers import AutoModelForCausalLM

    if device is None:
        if not torch.cuda.is_available():
            raise PandaError("[quant] needs a CUDA GPU: bitsandbytes quantizes on the GPU")
        device = torch.cuda.current_device()
    return AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=quantization_config(quant, compute_dtype),
        dtype=compute_dtype, device_map={"": device}, attn_implementation=attn,
        trust_remote_code=trust_remote_code)


def quantized_model_from_config(config: Any, quant: "QuantSection", *,
                                compute_dtype: "torch.dtype", device: Any = "cuda"
                                ) -> "torch.nn.Module":
    """A randomly initialised model of ``config``'s shape (a preset), built directly in
    4/8-bit one block at a time: only one block is ever held in ``compute_dtype``,
    so a 65B shape fits one 80 GB GPU. For benchmarks and memory checks."""
    bnb = _require_bitsandbytes()
    model = build_blockwise(
        config, dtype=compute_dtype, device=device,
        transform_block=lambda block: _quantize_linears(block, quant, compute_dtype, device, bnb))
    model.is_loaded_in_4bit = quant.bits == 4
    model.is_loaded_in_8bit = quant.bits == 8
    return model


def build_blockwise(config: Any, *, dtype: "torch.dtype", device: Any,
                    transform_block: Callable[["torch.nn.Module"], None] | None = None
                    ) -> "torch.nn.Module":
    """Build a randomly initialised causal LM of ``config``'s shape on ``device`` one
    transformer block at a time, calling ``transform_block`` on each block right
    after it is materialised (to quantize it, say), so at most one untransformed
    block exists at once.

    Everything outside the blocks (embeddings, rotary buffers, final norm, head)
    is built for real by transformers from a copy of the config with no layers, so
    its initialisation stays transformers' own; the blocks come from a model on
    the meta device and are given storage and transformers' init one by one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    list_path = block_prefixes(skeleton)[0].rsplit(".", 1)[0]
    blocks = skeleton.get_submodule(list_path)
    without_layers = {**config.to_dict(), "num_hidden_layers": 0}
    without_layers.pop("layer_types", None)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(type(config).from_dict(without_layers),
                                                 dtype=dtype)
    with torch.no_grad():
        for block in blocks:
            block.to_empty(device=device)
            for module in block.modules():
                model._init_weights(module)
            if transform_block is not None:
                transform_block(block)
    parent, _, attribute = list_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, blocks)
    model.config.num_hidden_layers = config.num_hidden_layers  # one config object is shared
    if getattr(config, "layer_types", None) is not None:
        model.config.layer_types = list(config.layer_types)
    return model


def _quantize_linears(block: "torch.nn.Module", quant: "QuantSection",
                      compute_dtype: "torch.dtype", device: Any, bnb: Any) -> None:
    """Replace every nn.Linear of ``block`` by its bitsandbytes counterpart, quantizing
    the weight it holds now."""
    import torch

    for parent in list(block.modules()):
        for child_name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            weight = linear.weight.data
            if quant.bits == 4:
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                          bias=linear.bias is not None,
                                          compute_dtype=compute_dtype,
                                          compress_statistics=quant.double_quant,
                                          quant_type=quant.type, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                                 compress_statistics=quant.double_quant,
                                                 quant_type=quant.type, module=layer).to(device)
            else:
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                            bias=linear.bias is not None,
                                            has_fp16_weights=False, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False,
                                                 has_fp16_weights=False).to(device)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, child_name, layer)


def is_quantized(model: "torch.nn.Module") -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_base(model: "torch.nn.Module") -> "torch.nn.Module":
    """k-bit preparation for QLoRA training, in place:

    * every base weight frozen;
    * normalisation weights in float32 (their statistics are what 4-bit
      training is most sensitive to);
    * input embeddings' outputs require grad when gradient checkpointing is on,
      so gradients reach the adapters inside checkpointed blocks.

    Unlike peft's ``prepare_model_for_kbit_training`` the frozen embeddings and
    ``lm_head`` stay in the load dtype: a float32 copy buys nothing for frozen
    weights and costs 2 GB on Llama-3-8B (4 bytes x 2 x 128256 x 4096).
    """
    import torch

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or \
            type(module).__name__.endswith(("RMSNorm", "LayerNorm", "Norm"))
        if is_norm:
            for parameter in module.parameters(recurse=False):
                if parameter.dtype in (torch.bfloat16, torch.float16):
                    parameter.data = parameter.data.float()
    if checkpointing_on(model):
        model.enable_input_require_grads()
    return model


def checkpointing_on(model: "torch.nn.Module") -> bool:
    # transformers 5 renamed is_gradient_checkpointing; read the new name first
    for attribute in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attribute) or hasattr(model, attribute):
            return bool(getattr(model, attribute))
    return False
