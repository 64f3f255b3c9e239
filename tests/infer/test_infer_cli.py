"""panda infer --prompt, the tensor-parallel backends on CPU, and the backends that refuse."""

from __future__ import annotations

import importlib.util

import pytest

SAMPLING_GREEDY = dict(temperature=0.0, max_new_tokens=16)
GREEDY = ["--temperature", "0", "--max-new-tokens", "16"]


def expected_text(backend, prompt, *, chat_template=True):
    from panda.infer.generation import complete
    from panda.infer.runner import encode_request
    from panda.infer.sampling import Sampling

    ids = encode_request(backend, prompt=prompt, chat_template=chat_template)
    return complete(backend, [ids], Sampling(**SAMPLING_GREEDY))[0].text


def test_prompt_and_stream_print_the_answer(run_panda, tiny_model_dir, hf_backend):
    expected = expected_text(hf_backend, "hello")
    plain = run_panda("infer", "--model", str(tiny_model_dir), "--prompt", "hello", *GREEDY)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"
    raw = run_panda("infer", "--model", str(tiny_model_dir), "--prompt", "hello", "--stream",
                    "--no-chat-template", *GREEDY)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == expected_text(hf_backend, "hello", chat_template=False) + "\n"
    assert raw.stdout != plain.stdout  # the chat template was applied to the first


def test_torch_tp_degree_1_matches_hf(tiny_model_dir, hf_backend):
    from panda.backends.infer.torch_tp import TorchTP

    prompts = ["hello world", "a", "the quick brown fox"]
    backend = TorchTP()
    backend.load(str(tiny_model_dir))
    try:
        assert type(backend.model.model.layers[0].mlp.down_proj.weight).__name__ == "DTensor"
        assert backend.generate_ids(prompts, **SAMPLING_GREEDY) == \
            hf_backend.generate_ids(prompts, **SAMPLING_GREEDY)
    finally:
        backend.close()


def test_torch_tp_two_processes_match_hf(run_panda, tiny_model_dir, hf_backend):
    # --nproc 2 re-runs the command under torchrun; gloo stands in for NCCL on the CPU.
    result = run_panda("infer", "--model", str(tiny_model_dir), "--backend", "torch-tp",
                       "--nproc", "2", "--prompt", "hello", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(expected_text(hf_backend, "hello") + "\n")
    assert result.stdout.count(expected_text(hf_backend, "hello")) == 1  # rank 0 prints alone


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_ds_degree_1_matches_hf(tiny_model_dir, hf_backend, monkeypatch):
    from panda.backends.infer.ds import DeepSpeedInference

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE"):  # deepspeed.init_distributed sets these
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    prompts = ["hello world", "a", "the quick brown fox"]
    backend = DeepSpeedInference()
    backend.load(str(tiny_model_dir))
    try:
        assert backend.generate_ids(prompts, **SAMPLING_GREEDY) == \
            hf_backend.generate_ids(prompts, **SAMPLING_GREEDY)
    finally:
        backend.close()


def test_tp_backend_explains_and_points_to_torch_tp(run_panda, tiny_model_dir):
    result = run_panda("infer", "--model", str(tiny_model_dir), "--backend", "tp",
                       "--prompt", "x")
    assert result.returncode == 2
    first, hint = result.stderr.strip().splitlines()
    assert first.startswith("error: backend 'tp' (the tensor-parallel package) is not supported")
    assert "setuptools>=81" in first and "transformers 5" in first
    assert hint.startswith("hint: use --backend torch-tp")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None,
                    reason="DeepSpeed is installed")
def test_ds_backend_without_deepspeed_names_the_extra(run_panda, tiny_model_dir):
    result = run_panda("infer", "--model", str(tiny_model_dir), "--backend", "ds",
                       "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: infer backend 'ds' needs DeepSpeed: "
                                     "pip install 'pandallm[deepspeed]'")


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--input", "in.jsonl"], "error: give exactly one of --prompt TEXT or "
     "--input IN.jsonl"),
    (["--prompt", "x", "--nproc", "2"], "error: --nproc 2: backend 'hf' runs in one process"),
    (["--prompt", "x", "-o", "fast_decod=on"], "error: --option for backend 'hf': fast_decod: "
     "Extra inputs are not permitted"),
    (["--prompt", "x", "--top-p", "0"], "error: --top-p must be in (0, 1] (got 0.0)"),
])
def test_argument_mistakes_exit_2(run_panda, tiny_model_dir, args, message):
    result = run_panda("infer", "--model", str(tiny_model_dir), *args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == message


def test_missing_model_folder_exits_2(run_panda, tmp_path):
    result = run_panda("infer", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: --model {tmp_path / 'nope'}: no such folder"
