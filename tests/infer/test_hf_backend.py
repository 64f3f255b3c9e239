"""The hf backend decodes exactly what the model's logits say, in every decoding mode."""

from __future__ import annotations

import pytest

PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "你好"]


def test_greedy_equals_hand_written_loop(hf_backend, greedy, greedy_reference):
    # One batch of prompts of different lengths: left padding must not change any row.
    got = hf_backend.generate_ids(PROMPTS, **greedy)
    for prompt, tokens in zip(PROMPTS, got):
        expected = greedy_reference(hf_backend.model, hf_backend.token_ids(prompt),
                                    greedy["max_new_tokens"], hf_backend.eos_token_ids)
        assert tokens == expected, prompt


@pytest.mark.parametrize("options", [dict(fast_decode="on", compile=False), dict(loop="generate")],
                         ids=["static-cache", "transformers-generate"])
def test_other_decoding_modes_match(tiny_model_dir, hf_backend, options, greedy):
    from panda.backends.infer.hf import HFBackend

    backend = HFBackend(HFBackend.Options(**options))
    backend.load(str(tiny_model_dir))
    assert backend.generate_ids(PROMPTS, **greedy) == \
        hf_backend.generate_ids(PROMPTS, **greedy)


def test_streamed_text_is_the_decoded_tokens(hf_backend, greedy):
    from panda.infer.sampling import Sampling

    ids = hf_backend.generate_ids(PROMPTS, **greedy)
    texts = ["" for _ in PROMPTS]
    reasons = [None for _ in PROMPTS]
    for chunk in hf_backend.stream(PROMPTS, Sampling(**greedy)):
        assert reasons[chunk.index] is None, "no chunk after a prompt's last one"
        texts[chunk.index] += chunk.text
        reasons[chunk.index] = chunk.finish_reason
    for text, tokens, reason in zip(texts, ids, reasons):
        assert text == hf_backend.tokenizer.decode(tokens, skip_special_tokens=True)
        assert reason == ("length" if len(tokens) == greedy["max_new_tokens"] else "stop")


def test_sampling_is_reproducible_with_a_seed(hf_backend):
    settings = dict(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=16)
    first = hf_backend.generate_ids(PROMPTS, seed=7, **settings)
    assert hf_backend.generate_ids(PROMPTS, seed=7, **settings) == first
    assert hf_backend.generate_ids(PROMPTS, seed=8, **settings) != first


def test_lora_adapter_applied_at_load_gives_merged_model_outputs(tiny_model_dir, hf_backend,
                                                                 tmp_path, greedy,
                                                                 greedy_reference):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from panda.backends.infer.hf import HFBackend
    from panda.models.tiny_tokenizer import load

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter really changes the outputs.
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    load().save_pretrained(tmp_path / "merged")

    with_adapter = HFBackend()
    with_adapter.load(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    merged_backend = HFBackend()
    merged_backend.load(str(tmp_path / "merged"))

    got = with_adapter.generate_ids(PROMPTS, **greedy)
    assert got == merged_backend.generate_ids(PROMPTS, **greedy)
    assert got != hf_backend.generate_ids(PROMPTS, **greedy), "adapter had no effect"
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == greedy_reference(merged, with_adapter.token_ids(prompt),
                                          greedy["max_new_tokens"],
                                          with_adapter.eos_token_ids)


def test_prompt_longer_than_the_context_is_a_user_error(hf_backend, greedy):
    from panda.errors import UsageError

    too_long = [5] * (hf_backend.context_length + 1)
    with pytest.raises(UsageError, match="fills the model's context"):
        hf_backend.generate_ids([too_long], **greedy)
