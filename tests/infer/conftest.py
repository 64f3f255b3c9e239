"""Fixtures for inference tests: a tiny random Llama saved like an exported model."""

from __future__ import annotations

import pytest

SAMPLING_GREEDY = dict(temperature=0.0, max_new_tokens=16)


def save_tiny_llama(folder, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from panda.models.presets import PRESETS
    from panda.models.tiny_tokenizer import load

    shape = {k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"}
    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    load().save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with config, safetensors weights and the tiny tokenizer (chat template included)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def hf_backend(tiny_model_dir):
    from panda.backends.infer.hf import HFBackend
    from panda.infer.runner import _quiet_transformers

    _quiet_transformers()
    backend = HFBackend()
    backend.load(str(tiny_model_dir))
    return backend


@pytest.fixture
def run_panda_input():
    """Run `panda ARGS` with ``text`` on its stdin (not a terminal); returns CompletedProcess."""
    import os
    import subprocess
    import sys

    def run(text: str, *args: str, timeout: float = 120):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PANDA_DEBUG", None)
        return subprocess.run([sys.executable, "-m", "panda", *args], input=text,
                              capture_output=True, text=True, timeout=timeout, env=env)

    return run


@pytest.fixture
def greedy():
    """Greedy decoding settings shared by the comparisons (keyword arguments of generate)."""
    return dict(SAMPLING_GREEDY)


@pytest.fixture
def greedy_reference():
    """The hand-written greedy loop: full forward over the whole text, argmax, no cache."""
    return _greedy_reference


def _greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos: set[int]
                      ) -> list[int]:
    import torch

    ids = list(prompt_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if token in eos:
                break
            new.append(token)
            ids.append(token)
    return new
