"""Loading Hugging Face models and tokenizers safely: local folders or preset shapes, no downloads.

What is refused, and why, is decided here before transformers is asked:

* a missing path, a file, or a folder without ``config.json`` -> PandaError;
* a folder whose model needs its own Python code (``auto_map`` for a model type
  this transformers does not know) while ``trust_remote_code`` is off -> PandaError;
* weights: ``*.safetensors`` are preferred; a folder with only PyTorch pickles
  (``pytorch_model*.bin``) is loaded with ``torch.load(weights_only=True)``, which
  rebuilds tensors and plain containers and never runs code from the file.

Everything that imports torch or transformers does so inside the function.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from panda.errors import PandaError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NO_DOWNLOAD_HINT = "give a local folder with config.json and *.safetensors; panda never downloads"
TRUST_HINT = "only if you trust where it comes from: set model.trust_remote_code = true"


# -- checking a model folder (plain Python: no torch, no transformers) ------------------------

def read_model_config(path: str) -> dict[str, Any]:
    """The folder's config.json as a dict, or a PandaError saying what is wrong with ``path``."""
    folder = Path(path)
    if not folder.exists():
        raise PandaError(f"model.path {path} does not exist", hint=NO_DOWNLOAD_HINT)
    if not folder.is_dir():
        raise PandaError(f"model.path {path} is a file, not a model folder", hint=NO_DOWNLOAD_HINT)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PandaError(f"model.path {path} has no config.json: it is not a Hugging Face model "
                         "folder", hint="point model.path at the folder holding config.json and "
                         "the weights (a checkpoint of another format: see `panda convert`)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PandaError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise PandaError(f"{config_file} is not a JSON object")
    return config


def weight_format(path: str) -> str:
    """``"safetensors"`` or ``"pickle"`` (``*.bin`` only); PandaError when there are no weights."""
    folder = Path(path)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return "safetensors"
    if any(folder.glob("pytorch_model*.bin")) or (folder / "pytorch_model.bin.index.json").is_file():
        return "pickle"
    raise PandaError(f"model.path {path} holds no weights (no *.safetensors, no "
                     "pytorch_model*.bin)", hint=NO_DOWNLOAD_HINT)


def needs_remote_code(config: dict[str, Any], known_model_types: set[str]) -> bool:
    """Whether loading this config would run Python code shipped in the folder."""
    auto_map = config.get("auto_map") or {}
    uses_custom_class = "AutoModelForCausalLM" in auto_map or "AutoConfig" in auto_map
    # transformers uses its own class for a model type it knows, even with an auto_map.
    return uses_custom_class and config.get("model_type") not in known_model_types


def check_model_folder(path: str, trust_remote_code: bool) -> dict[str, Any]:
    """Refuse, with what to do, the folders transformers would fail on or that would run code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = read_model_config(path)
    known = set(CONFIG_MAPPING_NAMES)
    model_type = config.get("model_type")
    if needs_remote_code(config, known):
        if not trust_remote_code:
            raise PandaError(f"model.path {path} ships its own Python code for model_type "
                             f"'{model_type}' (auto_map in config.json), and "
                             "model.trust_remote_code is off", hint=TRUST_HINT)
    elif model_type not in known:
        raise PandaError(f"transformers {transformers.__version__} does not know model_type "
                         f"'{model_type}' of {path}/config.json",
                         hint="upgrade transformers, or check the folder")
    return config


# -- building models --------------------------------------------------------------------------

def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_attention(attn: str) -> None:
    import importlib.util

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise PandaError("model.attn = 'flash_attention_2' needs the flash-attn package",
                         hint="pip install flash-attn --no-build-isolation (CUDA only), "
                         "or use attn = 'sdpa'")


def _user_error(exc: Exception, path: Optional[str], attn: str) -> Optional[PandaError]:
    """A PandaError for transformers errors the recipe can fix; None for the rest."""
    message = str(exc)
    if "trust_remote_code" in message:
        return PandaError(f"{path or 'the model'} needs its own Python code to load", hint=TRUST_HINT)
    if "attn_implementation" in message or "attention implementation" in message.lower():
        return PandaError(f"model.attn = '{attn}': {message.splitlines()[0]}",
                          hint="try attn = 'sdpa' or 'eager'")
    return None


def load_pretrained(path: str, *, dtype: str, attn: str, trust_remote_code: bool
                    ) -> "torch.nn.Module":
    """AutoModelForCausalLM from a local folder, safetensors first, pickles only weights-only."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path, trust_remote_code)
    check_attention(attn)
    safetensors = weight_format(path) == "safetensors"
    if not safetensors:
        log.warning("%s has only PyTorch pickle weights; loading them with weights_only=True. "
                    "Saving the model once with save_pretrained() writes safetensors.", path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), attn_implementation=attn,
            trust_remote_code=trust_remote_code, use_safetensors=safetensors,
            weights_only=True, local_files_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines()
                        if "WeightsUnpickler error" in line), "")
        raise PandaError(f"refusing to unpickle {path}: its weights file holds more than "
                         f"tensors, and loading it could run code. {refused}",
                         hint="if you trust its source, convert it once to safetensors with "
                         "transformers and point model.path at the result") from None
    except (ValueError, ImportError) as exc:
        error = _user_error(exc, path, attn)
        if error is None:
            raise
        raise error from exc


def preset_config(fields: dict[str, Any], *, vocab_size: int,
                  special_tokens: dict[str, Optional[int]]) -> Any:
    """The transformers config of a preset shape with the tokenizer's size and special ids."""
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type")
    fields.update({name: value for name, value in special_tokens.items() if value is not None})
    return AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab_size})


def build_from_preset(fields: dict[str, Any], *, vocab_size: int, dtype: str, attn: str,
                      seed: int, special_tokens: dict[str, Optional[int]]) -> "torch.nn.Module":
    """A randomly initialised model of a preset shape; the same ``seed`` gives the same weights.

    The global RNG is left as it was: initialisation draws from a forked generator.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_attention(attn)
    config = preset_config(fields, vocab_size=vocab_size, special_tokens=special_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                    attn_implementation=attn)
        except (ValueError, ImportError) as exc:
            error = _user_error(exc, None, attn)
            if error is None:
                raise
            raise error from exc


def read_config(path: str, trust_remote_code: bool) -> Any:
    """The transformers config of the model folder ``path``."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                      local_files_only=True)


def build_empty(config: Any, *, dtype: str, attn: str, trust_remote_code: bool
                ) -> "torch.nn.Module":
    """The architecture of ``config`` on the meta device: shapes and dtypes, no memory.

    A sharding backend fills it from rank 0 after sharding (``torch.nn.Module.to_empty``
    gives each shard its storage first).
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_attention(attn)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                attn_implementation=attn,
                                                trust_remote_code=trust_remote_code)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each block's activations in backward (non-reentrant torch checkpoint)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PandaError(f"{type(model).__name__} does not support activation checkpointing",
                         hint="set model.gradient_checkpointing = false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def fit_to_tokenizer(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings when the tokenizer has more tokens; take the tokenizer's pad id.

    The exported config and tokenizer must agree on the pad id (generation pads
    with it), and the tokenizer is what the data was made with.
    """
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        log.warning("resizing token embeddings from %d to %d to fit the tokenizer",
                    embeddings.num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id


# -- tokenizers -------------------------------------------------------------------------------

def load_tokenizer(path: Optional[str], *, preset: Optional[str], trust_remote_code: bool,
                   chat_template: Optional[str]) -> Any:
    """The tokenizer of ``path`` (or a tiny preset's), with the recipe's chat template and a pad token."""
    if path is None:
        if preset is None or not preset.startswith("tiny-"):
            raise PandaError(f"model.preset '{preset}' comes without a tokenizer",
                             hint="set tokenizer.path to a tokenizer folder (for example the "
                             "original model's)")
        from panda.models import tiny_tokenizer

        tokenizer = tiny_tokenizer.load()
    else:
        tokenizer = _tokenizer_from_folder(path, trust_remote_code)
    from panda.data.chat import resolve_template

    # The template the data is rendered with travels with the tokenizer into the export.
    tokenizer.chat_template = resolve_template(tokenizer, chat_template)
    ensure_pad_token(tokenizer)
    return tokenizer


def _tokenizer_from_folder(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise PandaError(f"tokenizer folder {path} does not exist", hint=NO_DOWNLOAD_HINT)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                             local_files_only=True)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise PandaError(f"the tokenizer in {path} needs its own Python code",
                             hint=TRUST_HINT) from exc
        reason = " ".join(str(exc).split())
        raise PandaError(f"cannot load a tokenizer from {path}: {reason}",
                         hint="the folder needs tokenizer.json or tokenizer.model and "
                         "tokenizer_config.json") from exc


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token: EOS (as LLaMA-Factory does), else UNK, else a new <pad>.

    Padding never carries loss (labels are -100) and is masked by position, not by
    id, so reusing EOS is safe and keeps the vocabulary unchanged.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
