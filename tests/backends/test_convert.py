"""``panda convert``: hf -> pipeline -> hf and zero -> hf are exact (bit for bit), a saved
ds-pipeline checkpoint converts to the folder the run exported, and unsafe or foreign
inputs are refused with a message."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ds_workers import LOOP_CASES, save_hf_folder
from panda.cli import cli

pytestmark = pytest.mark.usefixtures("deepspeed_cpu_ops")


def convert(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)], catch_exceptions=False)


def assert_same_tensors(folder, other):
    got, want = load_file(folder / "model.safetensors"), load_file(other / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.presets import PRESETS

    fields = {k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"}
    torch.manual_seed(5)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**fields, **extra}))


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 8}), ("qwen2", {}),
])
def test_hf_to_pipeline_to_hf_round_trip_is_exact(tmp_path, model_type, extra):
    original = tmp_path / "hf"
    save_hf_folder(tiny(model_type, **extra), original)
    assert convert("hf-to-pipeline", original, tmp_path / "pipe").exit_code == 0
    layers = sorted(p.name for p in (tmp_path / "pipe").glob("layer_*"))
    # embedding, 2 decoder layers, norm, and the head unless it is the embedding again
    assert len(layers) == (4 if extra.get("tie_word_embeddings") else 5)
    manifest = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert manifest["format"] == "panda-pipeline" and manifest["num_layers"] == 5
    assert convert("pipeline-to-hf", tmp_path / "pipe", tmp_path / "back").exit_code == 0
    assert_same_tensors(tmp_path / "back", original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    expected = json.loads((original / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in expected.items() if k != "transformers_version"}
    assert (tmp_path / "back" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", LOOP_CASES)
def test_zero_checkpoint_to_hf_equals_the_exported_model(deepspeed_runs, tmp_path, name):
    runs, _, _ = deepspeed_runs
    last = runs / name / "checkpoints" / "step-00000005"
    result = convert("zero-to-hf", last, tmp_path / "hf")
    assert result.exit_code == 0, result.output
    # the end-of-run export and the checkpoint hold the same fp32 master weights
    assert_same_tensors(tmp_path / "hf", runs / name / "final")


@pytest.mark.slow
def test_pipeline_checkpoint_to_hf_equals_the_exported_model(pipeline_runs, tmp_path):
    runs, _, _ = pipeline_runs
    last = runs / "run" / "checkpoints" / "step-00000005"
    assert any((last / "deepspeed" / "state").glob("layer_*-model_states.pt"))
    assert convert("pipeline-to-hf", last, tmp_path / "hf").exit_code == 0
    assert_same_tensors(tmp_path / "hf", runs / "run" / "final")


class NotAWeight:
    """An object a checkpoint has no business carrying."""


def test_zero_to_hf_never_unpickles_foreign_objects(tmp_path):
    from panda.backends.zero_export import safe_load

    folder = tmp_path / "ckpt" / "global_step1"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(1)}, "payload": NotAWeight()},
               folder / "mp_rank_00_model_states.pt")
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    with pytest.raises(Exception, match="panda does not unpickle arbitrary objects"):
        safe_load(folder / "mp_rank_00_model_states.pt")
    save_hf_folder(tiny("llama"), tmp_path / "config")
    result = CliRunner().invoke(cli, ["convert", "zero-to-hf", str(tmp_path / "ckpt"),
                                      str(tmp_path / "out"), "--config", str(tmp_path / "config")])
    assert result.exit_code == 2
    assert "panda does not unpickle arbitrary objects" in result.output
    assert not (tmp_path / "out").exists()


def test_convert_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["convert", "zero-to-hf", str(tmp_path / "empty"),
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not a DeepSpeed checkpoint" in result.output
    result = CliRunner().invoke(cli, ["convert", "pipeline-to-hf", str(tmp_path / "empty"),
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a" in result.output
