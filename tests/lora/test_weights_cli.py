"""The merge-lora / make-delta / apply-delta commands: output, refusals, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_models import fine_tuned, invoke, save_model, tiny_llama  # noqa: F401 (invoke is a fixture)


@pytest.fixture
def models(tmp_path):
    """base, target and the delta between them (bf16, several shards)."""
    base = tiny_llama(torch.bfloat16)
    save_model(base, tmp_path / "base")
    save_model(fine_tuned(base), tmp_path / "target")
    return tmp_path


def one_error_line(result) -> str:
    """The command failed as a user error: exit 2, one `error:` line, no traceback."""
    assert result.exit_code == 2, (result.output, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert set(result.stderr.splitlines()) - set(errors) <= {
        line for line in result.stderr.splitlines() if line.startswith("hint:")}
    return errors[0]


def test_make_and_apply_delta_through_the_cli(models, invoke):
    made = invoke("make-delta", "--base", str(models / "base"), "--target",
                  str(models / "target"), "--delta", str(models / "delta"),
                  "--max-shard-size", "200KB")
    assert made.exit_code == 0, made.stderr
    assert made.stdout.startswith(f"wrote {models / 'delta'}: 21 tensors")
    applied = invoke("apply-delta", "--base", str(models / "base"), "--delta",
                     str(models / "delta"), "--target", str(models / "rebuilt"))
    assert applied.exit_code == 0, applied.stderr
    assert (models / "rebuilt" / "tokenizer.json").is_file()


def _edit_shard(folder, edit):
    """Edit the tensors of the shard that holds model.norm.weight; keep the index true."""
    shard = next(p for p in sorted(folder.glob("model-*.safetensors"))
                 if "model.norm.weight" in load_file(str(p)))
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {name: file for name, file in index["weight_map"].items()
                           if file != shard.name or name in tensors}
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("broken_base, message", [
    ("missing", "error: tensor 'model.norm.weight' is in the delta but not in the base"),
    ("shape", "error: tensor 'model.norm.weight': the base has shape [32], the delta was made "
              "from shape [64]"),
    ("dtype", "error: tensor 'model.norm.weight': the base is float32, the delta was made from "
              "bfloat16"),
])
def test_a_base_that_does_not_match_the_delta_is_named(models, invoke, broken_base, message):
    invoke("make-delta", "--base", str(models / "base"), "--target", str(models / "target"),
           "--delta", str(models / "delta"))
    edits = {"missing": lambda t: t.pop("model.norm.weight"),
             "shape": lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32]}),
             "dtype": lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()})}
    _edit_shard(models / "base", edits[broken_base])
    result = invoke("apply-delta", "--base", str(models / "base"), "--delta",
                    str(models / "delta"), "--target", str(models / "rebuilt"))
    assert one_error_line(result) == message
    assert not (models / "rebuilt").exists()


def test_make_delta_names_a_target_tensor_the_base_lacks(models, invoke):
    _edit_shard(models / "base", lambda t: t.pop("model.norm.weight"))
    result = invoke("make-delta", "--base", str(models / "base"), "--target",
                    str(models / "target"), "--delta", str(models / "delta"))
    assert one_error_line(result) == (
        "error: tensor 'model.norm.weight' is in the target but not in the base")


def test_a_non_empty_output_is_kept_unless_overwrite(models, invoke):
    out = models / "delta"
    out.mkdir()
    (out / "my-notes.txt").write_text("trained for a week")
    args = ["make-delta", "--base", str(models / "base"), "--target", str(models / "target"),
            "--delta", str(out)]
    refused = invoke(*args)
    assert one_error_line(refused) == f"error: output folder {out} is not empty"
    assert "--overwrite" in refused.stderr
    assert (out / "my-notes.txt").read_text() == "trained for a week"

    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert not (out / "my-notes.txt").exists() and (out / "panda_delta.json").is_file()


def test_an_output_inside_an_input_is_refused_even_with_overwrite(models, invoke):
    result = invoke("apply-delta", "--base", str(models / "base"), "--delta",
                    str(models / "target"), "--target", str(models / "base"), "--overwrite")
    assert "overlaps the base folder" in one_error_line(result)
    assert (models / "base" / "config.json").is_file()


def test_a_folder_without_safetensors_is_a_user_error(models, invoke):
    (models / "empty").mkdir()
    result = invoke("merge-lora", "--base", str(models / "empty"), "--adapter",
                    str(models / "base"), "--out", str(models / "merged"))
    assert one_error_line(result).startswith("error: ")


def test_the_real_cli_reports_exit_2_in_one_line(models, run_panda):
    result = run_panda("apply-delta", "--base", str(models / "base"), "--delta",
                       str(models / "nowhere"), "--target", str(models / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: delta folder not found: {models / 'nowhere'}"
