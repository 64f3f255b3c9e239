"""The ``hf`` model plugin: presets, local folders, safe loading, tokenizers, checkpointing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from panda.errors import PandaError
from panda.models import tiny_tokenizer
from panda.recipe import validate
from panda.registry import registry


def recipe(model: dict, tokenizer: dict | None = None, seed: int = 42):
    data = {"model": model, "run": {"seed": seed},
            "data": {"sources": [{"name": "instruction", "path": "x.jsonl"}], "packing": False}}
    if tokenizer:
        data["tokenizer"] = tokenizer
    return validate(data)


def plugin_for(ctx):
    return registry.get("model", "hf")(ctx.model.options)


def build(model: dict, tokenizer: dict | None = None, seed: int = 42):
    ctx = recipe(model, tokenizer, seed)
    plugin = plugin_for(ctx)
    return plugin.build(ctx), plugin.tokenizer(ctx)


def same_weights(a, b) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved the Hugging Face way (safetensors + tokenizer), and its model."""
    model, tokenizer = build({"preset": "tiny-llama", "dtype": "float32"})
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def copy_config_only(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    return target


# -- presets -----------------------------------------------------------------------------------

def test_preset_is_sized_by_the_tokenizer_and_seeded_by_the_run():
    model, tokenizer = build({"preset": "tiny-llama", "dtype": "float32"})
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    again, _ = build({"preset": "tiny-llama", "dtype": "float32"})
    other_seed, _ = build({"preset": "tiny-llama", "dtype": "float32"}, seed=43)
    assert same_weights(model, again)
    assert not same_weights(model, other_seed)


def test_preset_build_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build({"preset": "tiny-llama", "dtype": "float32"})
    assert torch.equal(torch.rand(3), expected)


def test_preset_dtype_attention_and_vocab_size():
    model, _ = build({"preset": "tiny-qwen2", "attn": "eager", "vocab_size": 640})
    assert model.dtype == torch.bfloat16  # the recipe default
    assert model.config._attn_implementation == "eager"
    assert model.get_input_embeddings().num_embeddings == 640
    with pytest.raises(PandaError, match=r"vocab_size = 100 is smaller than the tokenizer's 512"):
        build({"preset": "tiny-llama", "vocab_size": 100})


def test_large_preset_without_tokenizer_path_asks_for_one():
    ctx = recipe({"preset": "llama-7b"})
    with pytest.raises(PandaError) as info:
        plugin_for(ctx).build(ctx)  # fails before allocating 7B parameters
    assert info.value.message == "model.preset 'llama-7b' comes without a tokenizer"
    assert "tokenizer.path" in info.value.hint


def test_preset_with_a_tokenizer_path_uses_that_tokenizer(tiny_folder):
    folder, _ = tiny_folder
    model, tokenizer = build({"preset": "tiny-mistral", "dtype": "float32"},
                             tokenizer={"path": str(folder)})
    assert len(tokenizer) == 512 and model.config.model_type == "mistral"


# -- local folders -----------------------------------------------------------------------------

def test_folder_loads_the_saved_weights_in_the_asked_dtype(tiny_folder):
    folder, original = tiny_folder
    loaded, tokenizer = build({"path": str(folder), "dtype": "float32"})
    assert same_weights(loaded, original)
    ids = torch.tensor([tokenizer("hello panda")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    half, _ = build({"path": str(folder), "dtype": "bfloat16"})
    assert half.dtype == torch.bfloat16


def test_pickle_only_folder_loads_weights_only(tiny_folder, tmp_path):
    folder, original = tiny_folder
    target = copy_config_only(folder, tmp_path / "bin")
    torch.save(original.state_dict(), target / "pytorch_model.bin")
    loaded, _ = build({"path": str(target), "dtype": "float32"}, tokenizer={"path": str(folder)})
    assert same_weights(loaded, original)


class _RunsCode:
    """Unpickling this object would create a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tiny_folder, tmp_path):
    folder, original = tiny_folder
    target = copy_config_only(folder, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    state = dict(original.state_dict())
    state["evil"] = _RunsCode(marker)
    torch.save(state, target / "pytorch_model.bin")
    with pytest.raises(PandaError) as info:
        build({"path": str(target), "dtype": "float32"}, tokenizer={"path": str(folder)})
    assert not marker.exists()
    assert info.value.message.startswith(f"refusing to unpickle {target}")
    # The file really would have run code with a full unpickle:
    torch.load(target / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(PandaError) as info:
        build({"path": str(tmp_path / "nowhere")}, tokenizer={"path": str(tmp_path)})
    assert info.value.message == f"model.path {tmp_path / 'nowhere'} does not exist"
    assert "never downloads" in info.value.hint


def test_tokenizer_folder_missing_is_a_user_error(tmp_path):
    with pytest.raises(PandaError, match="tokenizer folder .* does not exist"):
        build({"preset": "tiny-llama"}, tokenizer={"path": str(tmp_path / "nowhere")})
    with pytest.raises(PandaError, match=f"cannot load a tokenizer from {tmp_path}"):
        build({"preset": "tiny-llama"}, tokenizer={"path": str(tmp_path)})


def test_folder_without_config_or_weights_is_a_user_error(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(PandaError, match="has no config.json: it is not a Hugging Face model"):
        build({"path": str(tmp_path / "empty")}, tokenizer={"path": str(folder)})
    config_only = copy_config_only(folder, tmp_path / "config-only")
    with pytest.raises(PandaError, match=r"holds no weights \(no \*.safetensors"):
        build({"path": str(config_only)}, tokenizer={"path": str(folder)})
    file_path = tmp_path / "weights.safetensors"
    file_path.write_bytes(b"")
    with pytest.raises(PandaError, match="is a file, not a model folder"):
        build({"path": str(file_path)}, tokenizer={"path": str(folder)})


def test_remote_code_needs_trust_remote_code(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    target = copy_config_only(folder, tmp_path / "custom")
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="panda-custom-lm",
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(PandaError) as info:
        build({"path": str(target)}, tokenizer={"path": str(folder)})
    assert info.value.message == (
        f"model.path {target} ships its own Python code for model_type 'panda-custom-lm' "
        "(auto_map in config.json), and model.trust_remote_code is off")
    assert info.value.hint == ("only if you trust where it comes from: "
                               "set model.trust_remote_code = true")


def test_auto_map_for_a_known_model_type_loads_without_code(tiny_folder, tmp_path):
    folder, original = tiny_folder
    target = tmp_path / "known"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (target / "config.json").write_text(json.dumps(config))
    loaded, _ = build({"path": str(target), "dtype": "float32"})
    assert type(loaded).__name__ == "LlamaForCausalLM" and same_weights(loaded, original)


def test_unknown_model_type_without_code_is_a_user_error(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    target = copy_config_only(folder, tmp_path / "unknown")
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "not-a-model"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(PandaError, match="does not know model_type 'not-a-model'"):
        build({"path": str(target)}, tokenizer={"path": str(folder)})


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_a_user_error():
    with pytest.raises(PandaError, match="needs the flash-attn package"):
        build({"preset": "tiny-llama", "attn": "flash_attention_2"})


# -- tokenizers --------------------------------------------------------------------------------

def test_chat_template_override_and_default(tiny_folder):
    folder, _ = tiny_folder
    _, tokenizer = build({"preset": "tiny-llama"})
    assert tokenizer.chat_template == tiny_tokenizer.CHAT_TEMPLATE  # the tokenizer's own
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, tokenizer = build({"preset": "tiny-llama"}, tokenizer={"chat_template": jinja})
    assert tokenizer.chat_template == jinja
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         tokenize=False) == "hi"
    _, tokenizer = build({"path": str(folder)}, tokenizer={"chat_template": "chatml"})
    assert tokenizer.chat_template.startswith("{% for message in messages %}{{ '<|im_start|>'")


def test_missing_pad_token_becomes_eos(tmp_path):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(tiny_tokenizer.TOKENIZER_DIR))
    source.pad_token = None
    source.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config.get("pad_token") is None
    model, tokenizer = build({"preset": "tiny-llama"}, tokenizer={"path": str(tmp_path / "tok")})
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == 512 and model.config.pad_token_id == tokenizer.eos_token_id


def test_tokenizer_without_pad_eos_or_unk_gets_a_pad_and_the_model_grows(tiny_folder, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, original = tiny_folder
    vocab = {f"w{i}": i for i in range(512)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "bare")
    model, tokenizer = build({"path": str(folder), "dtype": "float32"},
                             tokenizer={"path": str(tmp_path / "bare")})
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 512
    assert model.get_input_embeddings().num_embeddings == 513
    assert model.config.pad_token_id == 512
    assert torch.equal(model.get_input_embeddings().weight[:512],
                       original.get_input_embeddings().weight)


# -- activation checkpointing ------------------------------------------------------------------

def test_gradient_checkpointing_is_non_reentrant_and_keeps_gradients(tiny_folder):
    folder, _ = tiny_folder
    plain, tokenizer = build({"path": str(folder), "dtype": "float32"})
    checkpointed, _ = build({"path": str(folder), "dtype": "float32",
                             "gradient_checkpointing": True})
    assert not plain.model.gradient_checkpointing and checkpointed.model.gradient_checkpointing
    layer_checkpoint = checkpointed.model.layers[0]._gradient_checkpointing_func
    assert layer_checkpoint.keywords == {"use_reentrant": False}
    ids = torch.tensor([tokenizer("a quick test of checkpointing")["input_ids"]])
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
