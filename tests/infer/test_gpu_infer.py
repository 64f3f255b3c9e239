"""On one GPU: every backend gives the hf backend's greedy tokens (run with: pytest -m gpu).

float32 weights keep the comparison exact: in bf16, different kernels (fused
DeepSpeed ops, compiled graphs) may round differently and flip a near-tie.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "你好"]
GREEDY = dict(temperature=0.0, max_new_tokens=32)


@pytest.fixture(scope="module")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def reference(cuda, tiny_model_dir):
    """The hf backend on the GPU, dynamic cache, float32."""
    from panda.backends.infer.hf import HFBackend

    backend = HFBackend(HFBackend.Options(dtype="float32", fast_decode="off"))
    backend.load(str(tiny_model_dir))
    assert backend.model.device.type == "cuda"
    return backend.generate_ids(PROMPTS, **GREEDY)


def test_hf_fast_decode_matches(tiny_model_dir, reference):
    from panda.backends.infer.hf import HFBackend

    backend = HFBackend(HFBackend.Options(dtype="float32"))  # fast_decode=auto: on, on a GPU
    backend.load(str(tiny_model_dir))
    assert backend._static is not None and backend._static.compile
    assert backend.generate_ids(PROMPTS, **GREEDY) == reference
    assert backend.generate_ids(PROMPTS[:2], **GREEDY) == reference[:2]  # another batch shape


def test_torch_tp_degree_1_matches(tiny_model_dir, reference):
    from panda.backends.infer.torch_tp import TorchTP

    backend = TorchTP(TorchTP.Options(dtype="float32"))
    backend.load(str(tiny_model_dir))
    try:
        assert backend.model.device.type == "cuda"
        assert backend.generate_ids(PROMPTS, **GREEDY) == reference
    finally:
        backend.close()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_ds_degree_1_matches(tiny_model_dir, reference):
    from panda.backends.infer.ds import DeepSpeedInference

    backend = DeepSpeedInference(DeepSpeedInference.Options(dtype="float32"))
    backend.load(str(tiny_model_dir))
    try:
        assert backend.generate_ids(PROMPTS, **GREEDY) == reference
    finally:
        backend.close()
