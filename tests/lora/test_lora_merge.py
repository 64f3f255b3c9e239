"""merge-lora: merged logits equal the adapter model's, within the documented tolerance.

Tolerance (panda/lora_merge.py, docs/lora.md): float32 base, max |merged - adapter|
<= 1e-5 * max |logit|; bfloat16 base, <= 5e-2 * max |logit|.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_models import input_ids, invoke, save_model, tiny_llama  # noqa: F401 (invoke is a fixture)
from panda.adapters import apply_lora, save_adapter
from panda.errors import PandaError
from panda.lora_merge import merge_adapter
from panda.recipe_schema import LoraSection

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def trained_adapter(base, folder, **lora_options):
    """An adapter whose lora_B is far from zero, so merging visibly changes the model."""
    model = apply_lora(base, LoraSection(dropout=0.0, **lora_options))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    save_adapter(model, folder)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_logits_equal_the_adapter_models(tmp_path, dtype):
    save_model(tiny_llama(dtype), tmp_path / "base")
    trained_adapter(tiny_llama(dtype), tmp_path / "adapter", r=8, alpha=16)
    report = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged",
                           max_shard_bytes=100_000)
    assert len(report.merged) == 14 and report.tensors == 21

    ids = input_ids(seed=1)
    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype),
        tmp_path / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype).eval()
    expected, got = logits(adapter_model, ids), logits(merged_model, ids)
    plain = logits(tiny_llama(dtype), ids)
    scale = expected.abs().max()
    assert (expected - plain).abs().max() > 0.1 * scale  # the adapter matters
    assert (got - expected).abs().max() <= TOLERANCE[dtype] * scale
    assert all(p.dtype == dtype for p in merged_model.parameters())


def test_merged_folder_is_a_plain_model_with_the_tokenizer(tmp_path):
    save_model(tiny_llama(), tmp_path / "base")
    trained_adapter(tiny_llama(), tmp_path / "adapter", r=4)
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged",
                  max_shard_bytes=100_000)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors.index.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    # the adapter's tokenizer files win: training may have added tokens
    assert "77" in (tmp_path / "merged" / "tokenizer_config.json").read_text()


def test_modules_to_save_and_added_tokens_are_merged(tmp_path):
    save_model(tiny_llama(), tmp_path / "base")
    grown = tiny_llama()
    grown.resize_token_embeddings(520)
    trained_adapter(grown, tmp_path / "adapter", r=4,
                    modules_to_save=["embed_tokens", "lm_head"])
    report = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert sorted(report.replaced) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert report.vocab_size == 520
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 520

    base = tiny_llama()
    base.resize_token_embeddings(520)
    adapter_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.cat([input_ids(seed=2), torch.arange(512, 520).repeat(2, 1)], dim=1)
    expected, got = logits(adapter_model, ids), logits(merged_model, ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_an_adapter_for_another_model_is_refused(tmp_path):
    save_model(tiny_llama(), tmp_path / "base")
    other = AutoModelForCausalLM.from_config(tiny_llama().config.__class__(
        **{**tiny_llama().config.to_dict(), "intermediate_size": 96}))
    trained_adapter(other, tmp_path / "adapter", r=4)
    with pytest.raises(PandaError, match=r"adapter does not fit the base at "
                       r"'model.layers.0.mlp.down_proj.weight': LoRA makes \[64, 96\], the "
                       r"weight is \[64, 128\]"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_dora_adapters_are_refused_not_merged_wrongly(tmp_path):
    save_model(tiny_llama(), tmp_path / "base")
    trained_adapter(tiny_llama(), tmp_path / "adapter", r=4)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    with pytest.raises(PandaError, match=r"cannot fold DoRA \(use_dora\)"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


def test_merge_lora_command(tmp_path, invoke):
    save_model(tiny_llama(), tmp_path / "base")
    trained_adapter(tiny_llama(), tmp_path / "adapter", r=4)
    result = invoke("merge-lora", "--base", str(tmp_path / "base"), "--adapter",
                    str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (f"wrote {tmp_path / 'merged'}: LoRA folded into 14 of 21 "
                                     "tensors")
    again = invoke("merge-lora", "--base", str(tmp_path / "base"), "--adapter",
                   str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert again.exit_code == 2 and "is not empty" in again.stderr
