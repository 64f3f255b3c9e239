"""The pretrain/sft loss against a plain computation, its memory behaviour, and NEFTune."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from panda.data.batches import model_inputs
from panda.plugins.methods.lm import LmOptions, Pretrain, Sft
from panda.plugins.methods.lm_loss import causal_lm_loss_sum
from panda.plugins.methods.neftune import NEFTuneNoise, example_lengths

VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(config).float()


def known_batch():
    """Two rows of 8 tokens; the second packs two documents; -100 marks prompts and padding."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100            # a 3-token prompt
    labels[1, 0] = -100             # document 1: positions 0..4, prompt at 0
    labels[1, 5] = -100             # document 2 starts at 5: its first token is no target
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 0, 1, 2]])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def reference_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """-log softmax(logits[b, t])[labels[b, t+1]] summed in float64, position by position."""
    total, count = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
    return total, count


def test_units_count_targets_after_the_first_position():
    batch = known_batch()
    # Row 0: labels 3..7 -> targets at t+1 = 3..7: 5. Row 1: t+1 in 1..7 minus position 5: 6.
    assert Sft().units(batch) == 11
    batch["labels"][0, 0] = 5  # position 0 is never a target: unchanged
    assert Sft().units(batch) == 11


def test_loss_matches_a_plain_position_by_position_reference():
    model = tiny_llama()
    batch = known_batch()
    total, count, metrics = Sft().loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    want_total, want_count = reference_loss_sum(logits, batch["labels"])
    assert total.dtype == torch.float32
    assert int(count) == want_count == Sft().units(batch)
    assert float(total.detach()) == pytest.approx(want_total, rel=1e-6)
    assert metrics == {}
    # Pretrain is the same objective (the data decides which tokens are labelled).
    assert float(Pretrain().loss(model, batch)[0].detach()) == pytest.approx(want_total, rel=1e-6)


def test_loss_under_bf16_autocast_is_summed_in_fp32():
    model = tiny_llama()
    batch = known_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, count, _ = Sft().loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert total.dtype == torch.float32
    assert float(total.detach()) == pytest.approx(reference_loss_sum(logits, batch["labels"])[0],
                                                  rel=2e-2)
    total.backward()
    assert model.lm_head.weight.grad is not None


def test_chunked_loss_and_gradients_equal_one_cross_entropy_call():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, VOCAB, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 10))
    labels[labels % 3 == 0] = -100
    # 2 rows of 64 logits per chunk: 15 chunks, some with no target at all.
    chunked, count = causal_lm_loss_sum(logits, labels, chunk_elements=2 * VOCAB)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(),
                            labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, logits)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_leaves_logits_alone_and_gives_their_dtype_of_gradient(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, VOCAB, dtype=dtype, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[0, 2] = -100
    total, _ = causal_lm_loss_sum(logits, labels, chunk_elements=3 * VOCAB)
    (total * 0.25).backward()
    assert torch.equal(logits.detach(), before)
    reference = logits.detach().float().requires_grad_(True)
    plain = F.cross_entropy(reference[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum")
    (plain * 0.25).backward()
    assert float(total.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert logits.grad.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(logits.grad.float(), reference.grad, rtol=tolerance,
                               atol=tolerance * 0.1)


def test_no_grad_evaluation_builds_no_gradient_buffer(monkeypatch):
    from panda.plugins.methods import lm_loss

    buffers = []
    real = lm_loss._gradient_dtype
    monkeypatch.setattr(lm_loss, "_gradient_dtype", lambda dtype: buffers.append(dtype) or real(dtype))
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        total, count = causal_lm_loss_sum(logits, labels)
    assert not total.requires_grad and buffers == [] and int(count) == 8
    with_grad, _ = causal_lm_loss_sum(logits, labels)
    assert buffers == [torch.float32]
    assert float(total) == pytest.approx(float(with_grad.detach()), rel=1e-6)


def test_a_second_backward_through_the_loss_raises():
    logits = torch.randn(1, 4, VOCAB, requires_grad=True)
    total, _ = causal_lm_loss_sum(logits, torch.randint(0, VOCAB, (1, 4)))
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def test_loss_does_not_keep_a_full_fp32_copy_of_the_logits():
    batch, seq, vocab = 2, 256, 4096
    logits = torch.randn(batch, seq, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    full = batch * seq * vocab

    def largest_saved_fp32(loss_fn) -> int:
        saved = []

        def pack(tensor):
            if tensor.dtype == torch.float32:
                saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn()
        loss.backward()
        return max(saved, default=0)

    naive = largest_saved_fp32(lambda: F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum"))
    assert naive >= full // 2  # the test can see a full-size fp32 copy when there is one
    chunked = largest_saved_fp32(
        lambda: causal_lm_loss_sum(logits, labels, chunk_elements=1 << 18)[0])
    assert chunked <= 1 << 18  # at most one chunk, and only while backward recomputes it
    assert logits.grad is not None


@pytest.mark.gpu
def test_loss_peak_memory_on_cuda_stays_near_the_bf16_logits():
    """Llama-3 vocabulary, 8k tokens: the naive fp32 loss costs ~3 extra fp32 copies."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    vocab, tokens = 128256, 8192
    logits = torch.randn(1, tokens, vocab, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")
    fp32_copy = tokens * vocab * 4

    def extra_peak(loss_fn):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        total = loss_fn()
        total.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, float(total.detach())

    def naive():
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                               labels[:, 1:].reshape(-1), reduction="sum")

    naive_peak, naive_value = extra_peak(naive)
    chunked_peak, chunked_value = extra_peak(lambda: causal_lm_loss_sum(logits, labels)[0])
    print(f"extra peak over the bf16 logits: naive {naive_peak / 2**30:.2f} GiB, "
          f"chunked {chunked_peak / 2**30:.2f} GiB (one fp32 copy = {fp32_copy / 2**30:.2f} GiB)")
    assert chunked_value == pytest.approx(naive_value, rel=1e-4)
    assert naive_peak > 1.5 * fp32_copy
    # The gradient buffer in bf16 (half an fp32 copy) plus a few fp32 chunks.
    assert chunked_peak < 0.5 * fp32_copy + 4 * (1 << 25) * 4


def test_loss_without_targets_is_zero_not_nan():
    model = tiny_llama()
    batch = known_batch()
    batch["labels"][:] = -100
    total, count, _ = Sft().loss(model, batch)
    assert float(total.detach()) == 0.0 and int(count) == 0 and Sft().units(batch) == 0


def test_every_key_but_labels_and_metadata_reaches_the_model():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, **kwargs):
            seen.update(kwargs)
            logits = torch.zeros(*kwargs["input_ids"].shape, VOCAB)

            class Output:
                pass

            output = Output()
            output.logits = logits
            return output

    batch = {**known_batch(), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "_source": ["a", "b"], "_lengths": [8, 8]}
    Sft().loss(Recorder(), batch)
    # use_cache=False: with a KV cache transformers stops separating packed documents
    assert sorted(seen) == ["attention_mask", "input_ids", "position_ids", "use_cache"]
    assert seen["use_cache"] is False
    assert sorted(model_inputs(batch)) == sorted(seen)


# -- NEFTune -----------------------------------------------------------------------------------

def noisy_zero_embedding(alpha: float, width: int):
    embedding = torch.nn.Embedding(8, width)
    torch.nn.init.zeros_(embedding.weight)
    embedding.weight.requires_grad_(False)
    noise = NEFTuneNoise(alpha)
    noise.attach(embedding)
    return embedding, noise


def test_example_lengths_by_hand():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    lengths = example_lengths((2, 6), position_ids, attention_mask)
    assert lengths.tolist() == [[3, 3, 3, 2, 2, 0], [4, 4, 4, 4, 0, 0]]
    assert example_lengths((1, 4)).tolist() == [[4, 4, 4, 4]]
    # A row that starts mid-document still opens an example at position 0 of the row.
    assert example_lengths((1, 4), torch.tensor([[5, 6, 0, 1]])).tolist() == [[2, 2, 2, 2]]


def test_neftune_is_off_in_eval_mode():
    embedding, _ = noisy_zero_embedding(alpha=5.0, width=64)
    embedding.eval()
    out = embedding(torch.zeros(2, 50, dtype=torch.long))
    assert torch.count_nonzero(out) == 0


def test_neftune_noise_is_uniform_with_magnitude_alpha_over_sqrt_length_times_width():
    torch.manual_seed(0)
    embedding, _ = noisy_zero_embedding(alpha=5.0, width=64)
    embedding.train()
    noise = embedding(torch.zeros(4, 400, dtype=torch.long))  # weights are 0: output = noise
    bound = 5.0 / math.sqrt(400 * 64)  # = 0.03125
    assert float(noise.abs().max()) <= bound * (1 + 1e-6)
    assert float(noise.abs().max()) > 0.99 * bound
    # U(-m, m): mean 0, standard deviation m / sqrt(3); 102400 draws
    assert abs(float(noise.mean())) < 0.01 * bound
    assert float(noise.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_neftune_scales_each_packed_document_and_skips_padding():
    torch.manual_seed(0)
    embedding, noise = noisy_zero_embedding(alpha=5.0, width=64)
    embedding.train()
    position_ids = torch.cat([torch.arange(100), torch.arange(250), torch.arange(50)])[None]
    attention_mask = torch.ones(1, 400, dtype=torch.long)
    attention_mask[0, 350:] = 0  # the last 50 positions are padding
    batch = {"input_ids": torch.zeros(1, 400, dtype=torch.long), "position_ids": position_ids,
             "attention_mask": attention_mask}
    with noise.for_batch(batch):
        out = embedding(batch["input_ids"])[0]
    first, second, padding = out[:100], out[100:350], out[350:]
    assert float(first.std()) == pytest.approx(5.0 / math.sqrt(100 * 64) / math.sqrt(3), rel=0.03)
    assert float(second.std()) == pytest.approx(5.0 / math.sqrt(250 * 64) / math.sqrt(3), rel=0.03)
    assert float(second.abs().max()) <= 5.0 / math.sqrt(250 * 64) * (1 + 1e-6)
    assert torch.count_nonzero(padding) == 0
    # Outside for_batch the row length is used (Hugging Face Trainer's formula).
    out = embedding(batch["input_ids"])
    assert float(out.abs().max()) <= 5.0 / math.sqrt(400 * 64) * (1 + 1e-6)


def test_neftune_loss_equals_a_forward_with_the_same_noise_added_by_hand():
    model = tiny_llama()
    batch = known_batch()
    method = Sft(LmOptions(neftune_alpha=5.0))
    assert method.prepare(model, ctx=None) is model
    method.prepare(model, ctx=None)  # twice: still one hook
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    model.train()
    torch.manual_seed(7)
    total, count, _ = method.loss(model, batch)
    total = total.detach()

    torch.manual_seed(7)
    with torch.no_grad():
        embeds = F.embedding(batch["input_ids"], model.get_input_embeddings().weight)
        # documents: row 0 has one of 8 tokens; row 1 has 5 then 3 tokens (position_ids)
        lengths = torch.tensor([[8.0] * 8, [5.0] * 5 + [3.0] * 3])
        magnitude = (5.0 / torch.sqrt(lengths * embeds.size(-1))).unsqueeze(-1)
        noisy = embeds + torch.empty_like(embeds).uniform_(-1, 1) * magnitude
        logits = model(inputs_embeds=noisy, position_ids=batch["position_ids"], use_cache=False).logits
    want_total, want_count = reference_loss_sum(logits, batch["labels"])
    assert int(count) == want_count
    assert float(total) == pytest.approx(want_total, rel=1e-6)

    # ...and differs from the noiseless loss, which eval mode gives back.
    model.eval()
    with torch.no_grad():
        clean = float(method.loss(model, batch)[0])
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert clean == pytest.approx(reference_loss_sum(plain, batch["labels"])[0], rel=1e-6)
    assert clean != pytest.approx(float(total), rel=1e-4)


def test_neftune_alpha_zero_adds_no_hook():
    model = tiny_llama()
    Sft(LmOptions(neftune_alpha=0.0)).prepare(model, ctx=None)
    assert len(model.get_input_embeddings()._forward_hooks) == 0
