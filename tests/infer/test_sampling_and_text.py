"""Token choice from logits, and text pieces that are safe to print as they come."""

from __future__ import annotations

import pytest


def test_top_k_and_top_p_keep_the_right_tokens():
    import torch

    from panda.infer.sampling import filter_top_k, filter_top_p

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    # 0.5 + 0.3 = 0.8 reaches top_p = 0.8: the third token is not needed.
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_lowers_seen_tokens_only():
    import torch

    from panda.infer.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0]]


def test_sampling_settings_are_checked():
    from panda.errors import UsageError
    from panda.infer.sampling import Sampling

    with pytest.raises(UsageError, match=r"^--temperature must be >= 0 \(0 means greedy\) "
                                         r"\(got -1\)$"):
        Sampling(temperature=-1)
    with pytest.raises(UsageError, match="unknown sampling option"):
        Sampling.from_kwargs(temprature=1.0)


def test_incremental_text_never_splits_a_character():
    from panda.infer.detokenize import IncrementalDetokenizer
    from panda.models.tiny_tokenizer import load

    tokenizer = load()
    text = "你好，世界! naïve café 🐼 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: several tokens per character
    stream = IncrementalDetokenizer(tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
