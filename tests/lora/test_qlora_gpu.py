"""QLoRA on a GPU: 4/8-bit bases from a checkpoint or built from a shape, LoRA on top.

bitsandbytes quantizes on CUDA, so these run with `pytest -m gpu` on a GPU host
with `pip install 'pandallm[quant]'`. On CPU, the missing-dependency message and
the BitsAndBytesConfig are checked instead.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_models import input_ids, save_model, tiny_config, tiny_llama
from panda.adapters import (apply_lora, build_blockwise, load_quantized_base,
                            quantization_config, quantized_model_from_config)
from panda.errors import MissingDependencyError
from panda.recipe_schema import LoraSection, QuantSection

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_cuda_and_bnb = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_BNB),
    reason="QLoRA needs a CUDA GPU and bitsandbytes (pip install 'pandallm[quant]')")


def test_quantization_config_follows_the_quant_section():
    four = quantization_config(QuantSection(bits=4, type="fp4", double_quant=False),
                               torch.bfloat16)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant,
            four.bnb_4bit_compute_dtype) == (True, "fp4", False, torch.bfloat16)
    eight = quantization_config(QuantSection(bits=8), "float16")
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.mark.skipif(HAVE_BNB, reason="bitsandbytes is installed")
def test_missing_bitsandbytes_names_the_extra(tmp_path):
    with pytest.raises(MissingDependencyError) as raised:
        load_quantized_base(tmp_path, QuantSection(), compute_dtype=torch.bfloat16)
    assert raised.value.message == ("[quant] needs bitsandbytes: "
                                    "pip install 'pandallm[quant]'")


def test_blockwise_build_gives_the_model_transformers_builds():
    # The CPU half of quantized_model_from_config: blocks materialised one by one.
    from transformers import AutoModelForCausalLM

    seen = []

    def transform(block):
        assert not any(p.is_meta for p in block.parameters()) and len(seen) < 2
        seen.append(block)

    model = build_blockwise(tiny_config(), dtype=torch.float32, device="cpu",
                            transform_block=transform)
    reference = AutoModelForCausalLM.from_config(tiny_config())
    assert seen == list(model.model.layers) and model.config.num_hidden_layers == 2
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()]
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=input_ids()).logits).all()


def _train(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids().cuda()
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@needs_cuda_and_bnb
@pytest.mark.parametrize("quant", [QuantSection(bits=4, type="nf4"), QuantSection(bits=8)],
                         ids=["nf4", "int8"])
def test_qlora_trains_only_adapters_on_a_quantized_checkpoint(tmp_path, quant):
    import bitsandbytes as bnb

    save_model(tiny_llama(torch.bfloat16), tmp_path / "base")
    base = load_quantized_base(tmp_path / "base", quant, compute_dtype=torch.bfloat16)
    quantized_type = bnb.nn.Linear4bit if quant.bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(base.model.layers[0].self_attn.q_proj, quantized_type)
    model = apply_lora(base, LoraSection(r=8, dropout=0.0), quant)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.gpu
@needs_cuda_and_bnb
def test_a_preset_shape_is_built_directly_in_4_bit():
    import bitsandbytes as bnb

    quant = QuantSection(bits=4)
    model = quantized_model_from_config(tiny_config(), quant, compute_dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in linears) == 14  # lm_head stays bf16
    assert not any(p.is_meta for p in model.parameters())
    model = apply_lora(model, LoraSection(r=8, dropout=0.0), quant)
    assert torch.isfinite(torch.tensor(_train(model, steps=1))).all()
