"""Architecture shapes by name: Hugging Face config fields, no weights, no downloads.

``[model] preset = "llama3-8b"`` builds a randomly initialised model of that
shape (for benchmarks and from-scratch pre-training). Shapes follow the
published config.json of each model family.
"""

from __future__ import annotations

from typing import Any

_LLAMA1 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048,
               rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
_LLAMA2 = dict(_LLAMA1, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(_LLAMA1, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


def _shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None
           ) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads)


PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": {**_LLAMA1, **_shape(4096, 11008, 32, 32)},
    "llama-13b": {**_LLAMA1, **_shape(5120, 13824, 40, 40)},
    "llama-33b": {**_LLAMA1, **_shape(6656, 17920, 60, 52)},
    "llama-65b": {**_LLAMA1, **_shape(8192, 22016, 80, 64)},
    "llama2-7b": {**_LLAMA2, **_shape(4096, 11008, 32, 32)},
    "llama2-13b": {**_LLAMA2, **_shape(5120, 13824, 40, 40)},
    "llama2-70b": {**_LLAMA2, **_shape(8192, 28672, 80, 64, 8)},
    "llama3-8b": {**_LLAMA3, **_shape(4096, 14336, 32, 32, 8)},
    "llama3-70b": {**_LLAMA3, **_shape(8192, 28672, 80, 64, 8)},
    "llama3.2-1b": {**_LLAMA3, **_shape(2048, 8192, 16, 32, 8), "head_dim": 64,
                    "max_position_embeddings": 131072, "tie_word_embeddings": True,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    "mistral-7b": {**_LLAMA2, **_shape(4096, 14336, 32, 32, 8), "model_type": "mistral",
                   "max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen2-7b": {**_shape(3584, 18944, 28, 28, 4), "model_type": "qwen2", "vocab_size": 152064,
                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                 "hidden_act": "silu", "tie_word_embeddings": False},
    "phi3-mini": {**_shape(3072, 8192, 32, 32), "model_type": "phi3", "vocab_size": 32064,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                  "hidden_act": "silu", "tie_word_embeddings": False},
    # Tiny shapes for tests and the demo: seconds on a CPU.
    "tiny-llama": {**_LLAMA2, **_shape(64, 128, 2, 4, 2), "vocab_size": 512,
                   "max_position_embeddings": 1024},
    "tiny-mistral": {**_LLAMA2, **_shape(64, 128, 2, 4, 2), "model_type": "mistral",
                     "vocab_size": 512, "max_position_embeddings": 1024, "sliding_window": None},
    "tiny-qwen2": {**_shape(64, 128, 2, 4, 2), "model_type": "qwen2", "vocab_size": 512,
                   "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                   "hidden_act": "silu", "tie_word_embeddings": False},
}


def parameter_count(preset: dict[str, Any]) -> int:
    """Parameters of a Llama-family shape (embeddings included), without building it."""
    h, i, n = preset["hidden_size"], preset["intermediate_size"], preset["num_hidden_layers"]
    heads, kv = preset["num_attention_heads"], preset["num_key_value_heads"]
    head_dim = preset.get("head_dim") or h // heads
    vocab = preset["vocab_size"]
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    block = attention + 3 * h * i + 2 * h
    embeddings = vocab * h * (1 if preset.get("tie_word_embeddings") else 2)
    return n * block + embeddings + h
