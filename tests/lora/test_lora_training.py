"""apply_lora / save_adapter / load_adapter_weights on a tiny Llama, trained in a plain loop."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lora_models import input_ids, save_model, tiny_llama
from panda.adapters import (apply_lora, load_adapter_weights, prepare_quantized_base,
                            resolve_target_modules, save_adapter)
from panda.errors import PandaError
from panda.recipe_schema import LoraSection

BLOCK_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = input_ids()
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_all_linear_means_the_linear_layers_of_the_blocks():
    model = tiny_llama()
    assert resolve_target_modules(model, "all-linear") == BLOCK_LINEARS


def test_all_linear_uses_full_paths_when_a_short_name_would_reach_outside_the_blocks():
    model = tiny_llama()
    model.q_proj = torch.nn.Linear(64, 64)  # a head outside the blocks, sharing a short name
    targets = resolve_target_modules(model, "all-linear")
    assert "q_proj" not in targets and "model.layers.0.self_attn.q_proj" in targets
    assert len(targets) == 2 * len(BLOCK_LINEARS)


def test_an_unknown_target_module_names_the_linear_layers():
    with pytest.raises(PandaError, match="no module named 'qkv' in LlamaForCausalLM; its linear "
                       "layers are down_proj, gate_proj, k_proj, lm_head, o_proj"):
        resolve_target_modules(tiny_llama(), ["q_proj", "qkv"])


def test_training_changes_only_the_adapter_weights():
    lora = LoraSection(r=4, alpha=8, dropout=0.1)
    model = apply_lora(tiny_llama(), lora)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert sorted(config.target_modules) == BLOCK_LINEARS
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    losses = train_steps(model)

    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every adapter weight moved (lora_B starts at zero)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert len(changed) == 2 * 2 * len(BLOCK_LINEARS)  # A and B, 2 layers, 7 linears
    assert losses[-1] < losses[0]


def test_modules_to_save_train_a_copy_and_leave_the_base_module_alone():
    model = apply_lora(tiny_llama(), LoraSection(r=4, modules_to_save=["lm_head"]))
    original = model.base_model.model.lm_head.original_module.weight.detach().clone()
    before = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    train_steps(model)
    head = model.base_model.model.lm_head
    assert torch.equal(head.original_module.weight, original)
    assert not torch.equal(head.modules_to_save["default"].weight, before)


def test_trainable_weights_of_a_bf16_base_are_float32():
    model = apply_lora(tiny_llama(torch.bfloat16), LoraSection(r=4, modules_to_save=["lm_head"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_adapters_get_gradients_under_gradient_checkpointing():
    # Reentrant checkpointing passes no gradient to a block whose inputs need none:
    # the frozen embeddings' output must be made to require grad.
    base = tiny_llama()
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": True})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = apply_lora(base, LoraSection(r=4, dropout=0.0))
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A's are 0 at init
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_saved_adapter_loads_with_peft_and_resumes(tmp_path):
    base = tiny_llama()
    save_model(base, tmp_path / "base")
    model = apply_lora(tiny_llama(), LoraSection(r=4, dropout=0.0))
    train_steps(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    ids = input_ids(seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    resumed = apply_lora(tiny_llama(), LoraSection(r=4, dropout=0.0))
    load_adapter_weights(resumed, tmp_path / "adapter")
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        assert torch.equal(resumed(input_ids=ids).logits, expected)


def test_loading_an_adapter_of_another_shape_fails(tmp_path):
    save_adapter(apply_lora(tiny_llama(), LoraSection(r=4)), tmp_path / "adapter")
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        load_adapter_weights(apply_lora(tiny_llama(), LoraSection(r=8)), tmp_path / "adapter")


def test_k_bit_preparation_keeps_norms_in_float32_and_embeddings_as_loaded():
    model = prepare_quantized_base(tiny_llama(torch.bfloat16))
    assert not any(p.requires_grad for p in model.parameters())
    for name, parameter in model.named_parameters():
        expected = torch.float32 if "norm" in name else torch.bfloat16
        assert parameter.dtype == expected, name


def test_quant_needs_a_quantized_model():
    from panda.recipe_schema import QuantSection

    with pytest.raises(PandaError, match="not quantized"):
        apply_lora(tiny_llama(), LoraSection(), QuantSection())
