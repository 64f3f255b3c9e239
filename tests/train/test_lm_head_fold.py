"""A frozen LM head folded into the log-prob kernel gives the loss and gradients of the plain
logits path (fp32, tiny Llama with LoRA), and is folded only where that is sound."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from panda.adapters import apply_lora
from panda.plugins.methods.lm_head import folded_head, foldable_head
from panda.plugins.methods.lm_loss import causal_lm_loss_sum
from panda.plugins.methods.preference import labelled_row_logps
from panda.recipe_schema import LoraSection


def tiny_lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         tie_word_embeddings=False)
    model = apply_lora(LlamaForCausalLM(config), LoraSection(r=4, dropout=0.0))
    with torch.no_grad():  # adapters away from zero, so their gradients depend on the head
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 20), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def unfolded_loss(model, ids, labels):
    return causal_lm_loss_sum(model(input_ids=ids).logits, labels)[0]


def folded_loss(model, ids, labels):
    with folded_head(model) as head:
        assert head is not None
        states = model(input_ids=ids).logits
    assert states.shape[-1] == 32  # the final states, not logits
    return causal_lm_loss_sum(states, labels, chunk_elements=97 * 7, head=head)[0]


def test_folded_lm_loss_and_gradients_equal_the_logits_path():
    model, (ids, labels) = tiny_lora_model(), batch()
    reference = unfolded_loss(model, ids, labels)
    (reference * 0.37).backward()
    expected = grads(model)
    loss = folded_loss(model, ids, labels)
    (loss * 0.37).backward()
    got = grads(model)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert got.keys() == expected.keys() and any("lora_A" in k for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)  # fp32, another summation order


def test_folded_pair_logps_and_gradients_equal_the_logits_path():
    from panda.plugins.methods.token_logps import row_logps

    model, (ids, labels) = tiny_lora_model(), batch(2)
    weights = torch.tensor([0.3, -1.2, 0.7])  # a different upstream gradient per row
    sums, counts = row_logps(model(input_ids=ids).logits, labels)
    (sums * weights).sum().backward()
    expected = grads(model)
    folded_sums, folded_counts = labelled_row_logps(model, ids, labels)  # folds the head
    (folded_sums * weights).sum().backward()
    torch.testing.assert_close(folded_sums, sums, rtol=1e-6, atol=1e-5)
    assert torch.equal(folded_counts, counts)
    for name, value in grads(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)  # fp32, another summation order


def test_the_head_is_restored_after_the_context():
    model, (ids, _) = tiny_lora_model(), batch()
    before = model(input_ids=ids).logits
    with folded_head(model):
        pass
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError), folded_head(model):
        raise RuntimeError("a failing forward")
    assert model(input_ids=ids).logits.shape[-1] == 97


def test_a_head_is_folded_only_where_that_is_sound():
    model = tiny_lora_model()
    assert foldable_head(model) is not None
    bare = model.get_base_model()
    bare.lm_head.weight.requires_grad_(True)  # full fine-tuning: its gradient is needed
    assert foldable_head(model) is None
    bare.lm_head.weight.requires_grad_(False)
    bare.config.final_logit_softcapping = 30.0  # logits transformed after the head
    assert foldable_head(model) is None
    bare.config.final_logit_softcapping = None
    bare.config.model_type = "gemma2"  # a family not known to end at the head
    assert foldable_head(model) is None
