"""make-delta / apply-delta: bitwise-exact round trips, enlarged vocabularies, plain deltas."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lora_models import fine_tuned, save_model, tiny_llama
from panda.delta import DELTA_INFO, apply_delta, make_delta, reconstruct
from panda.errors import PandaError
from panda.models.shards import INDEX_NAME, ShardedWeights


def bits(tensor: torch.Tensor) -> torch.Tensor:
    as_int = {4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()]
    return tensor.reshape(-1).view(as_int)


def assert_bitwise_equal(expected_dir, actual_dir):
    with ShardedWeights(expected_dir) as expected, ShardedWeights(actual_dir) as actual:
        assert sorted(expected.names) == sorted(actual.names)
        for name in expected.names:
            want, got = expected.get(name), actual.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(bits(got), bits(want)), f"{name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bitwise_exact_over_several_shards(tmp_path, dtype):
    base = tiny_llama(dtype)
    save_model(base, tmp_path / "base")
    save_model(fine_tuned(base, scale=2e-3), tmp_path / "target")
    made = make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta",
                      max_shard_bytes=200_000)
    applied = apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "rebuilt",
                          max_shard_bytes=100_000)

    assert made.tensors == applied.tensors == 21
    assert_bitwise_equal(tmp_path / "target", tmp_path / "rebuilt")
    for folder in ("delta", "rebuilt"):  # sharded, with an index, config and tokenizer
        files = sorted(os.listdir(tmp_path / folder))
        assert sum(f.endswith(".safetensors") for f in files) > 1
        assert {INDEX_NAME, "config.json", "tokenizer.json", "generation_config.json"} <= set(files)
    assert DELTA_INFO not in os.listdir(tmp_path / "rebuilt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_wider_delta_is_needed_for_exactness():
    # The reason for float32 deltas: in bf16 itself, b + (t - b) != t for many elements.
    torch.manual_seed(0)
    base = (torch.randn(100_000) * 0.02).bfloat16()
    target = (base.float() + torch.randn(100_000) * 1e-3).bfloat16()
    same_dtype = base + (target - base)
    assert (bits(same_dtype) != bits(target)).sum() > 100
    wide = reconstruct(base, target.float() - base.float(), torch.bfloat16)
    assert torch.equal(bits(wide), bits(target))


def _write_single(folder, tensors):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elements_no_difference_can_carry_are_restored_verbatim(tmp_path, dtype):
    # Targets tiny next to their base, signed zeros, NaN and infinities defeat
    # (b + (t - b)); make-delta stores those elements as exact fix-ups.
    base = torch.tensor([1.0, 0.5, 1.0, 2.0, 3.0, float("inf"), 0.25, 7.0]).to(dtype)
    target = torch.tensor([1e-30, -0.0, float("nan"), float("inf"), -float("inf"), 1.0,
                           1e-9, 7.5]).to(dtype)
    _write_single(tmp_path / "base", {"w": base})
    _write_single(tmp_path / "target", {"w": target})

    report = make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    assert report.exact_fixes >= 4
    apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "rebuilt")
    assert_bitwise_equal(tmp_path / "target", tmp_path / "rebuilt")


def test_enlarged_vocabulary_keeps_extra_rows_whole(tmp_path):
    base = tiny_llama(torch.bfloat16)
    save_model(base, tmp_path / "base")
    target = fine_tuned(base)
    target.resize_token_embeddings(520)  # 8 added tokens: new embedding and lm_head rows
    with torch.no_grad():
        target.get_input_embeddings().weight[512:] = torch.randn(8, 64).bfloat16()
        target.get_output_embeddings().weight[512:] = torch.randn(8, 64).bfloat16()
    save_model(target, tmp_path / "target")

    report = make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    assert sorted(report.enlarged) == ["lm_head.weight", "model.embed_tokens.weight"]
    with ShardedWeights(tmp_path / "delta") as delta, ShardedWeights(tmp_path / "target") as t:
        stored = delta.get("model.embed_tokens.weight")
        assert stored.shape == (520, 64)
        assert torch.equal(stored[512:], t.get("model.embed_tokens.weight")[512:].float())
    applied = apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "rebuilt")
    assert sorted(applied.enlarged) == sorted(report.enlarged)
    assert_bitwise_equal(tmp_path / "target", tmp_path / "rebuilt")
    assert json.loads((tmp_path / "rebuilt" / "config.json").read_text())["vocab_size"] == 520


def test_a_plain_delta_is_added_in_float32_in_its_own_dtype(tmp_path):
    # FastChat / PandaLLM style: no panda_delta.json, fp16 differences, a larger vocabulary.
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 8).half(), "emb": torch.randn(6, 8).half()}
    delta = {"w": (torch.randn(4, 8) * 1e-2).half(), "emb": torch.randn(7, 8).half()}
    _write_single(tmp_path / "base", base)
    _write_single(tmp_path / "delta", delta)

    report = apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "target")
    assert report.plain_delta and report.enlarged == ["emb"]
    with ShardedWeights(tmp_path / "target") as target:
        assert torch.equal(target.get("w"), (base["w"].float() + delta["w"].float()).half())
        emb = target.get("emb")
        assert torch.equal(emb[:6], (base["emb"].float() + delta["emb"][:6].float()).half())
        assert torch.equal(emb[6:], delta["emb"][6:])


def test_a_different_base_of_the_same_shape_is_refused(tmp_path):
    base = tiny_llama(torch.float32, seed=0)
    save_model(base, tmp_path / "base")
    save_model(fine_tuned(base), tmp_path / "target")
    save_model(tiny_llama(torch.float32, seed=5), tmp_path / "other")
    make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    with pytest.raises(PandaError, match="is not the one this delta was made from"):
        apply_delta(tmp_path / "other", tmp_path / "delta", tmp_path / "rebuilt")
    assert not (tmp_path / "rebuilt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shards_respect_the_size_limit(tmp_path):
    base = tiny_llama(torch.float32)
    save_model(base, tmp_path / "base")
    save_model(fine_tuned(base), tmp_path / "target")
    make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "delta" / INDEX_NAME).read_text())
    largest_tensor = 512 * 64 * 4
    for shard in set(index["weight_map"].values()):
        size = (tmp_path / "delta" / shard).stat().st_size
        assert size <= 150_000 + largest_tensor
