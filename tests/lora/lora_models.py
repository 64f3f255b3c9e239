"""Tiny Llama models built from config (hidden 64, 2 layers), saved as sharded folders; the
in-process CLI fixture. (Not a conftest.py: tests/test_docs.py imports the top conftest by name.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "panda" / "assets" / "tokenizer-tiny"
VOCAB = 512


def tiny_config(vocab_size: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=128, tie_word_embeddings=False)


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0,
               vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size)).to(dtype).eval()


def save_model(model: torch.nn.Module, folder: Path, shard: str = "60KB") -> Path:
    """save_pretrained in several shards (the tiny model is ~600 KB in fp32), plus the
    repository's tiny tokenizer files, so copying of tokenizer files is exercised."""
    model.save_pretrained(folder, max_shard_size=shard)
    for path in TOKENIZER_DIR.iterdir():
        shutil.copy2(path, folder / path.name)
    return folder


def fine_tuned(model: LlamaForCausalLM, scale: float = 1e-3, seed: int = 1) -> LlamaForCausalLM:
    """A copy of ``model`` with every weight moved a little, like a fine-tune does."""
    generator = torch.Generator().manual_seed(seed)
    target = LlamaForCausalLM(model.config).to(model.dtype).eval()
    target.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in target.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_((parameter.float() + noise).to(parameter.dtype))
    return target


def input_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def invoke():
    """Run the panda CLI in-process (click's CliRunner); returns the click Result."""
    from click.testing import CliRunner

    from panda.cli import cli

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return run
