"""The ``ds-pipeline`` backend on CPU with 2 gloo ranks as 2 pipeline stages.

* one optimizer step (4 micro-batches of unequal length, clipping on) gives the loss and the
  updated weights of a plain PyTorch step on the unsplit model (rel 1e-5, DESIGN section 6);
* the pipelined loss of LLaMA (tied embeddings), Mistral (sliding window) and Qwen2 shapes
  equals the Hugging Face model's on the same batch, packed documents included (atol 1e-4
  on a sum over ~40 tokens);
* 5 steps through the whole loop match a single process at the same global batch, resume
  from the pipeline's own checkpoint to the same losses, and export an HF folder whose
  logits equal the single-process model's (atol 1e-5).

2 stages x 2 data-parallel replicas runs as 4 processes time-sharing the CI runner's 2 cores:
the loop's losses match the single process too, each replica reading its half of the data.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from ds_workers import PIPELINE, pipeline_train_worker, pipeline_worker, save_hf_folder
from standins import collate, free_port, next_token_loss, random_sequences, tiny_llama
from test_loss_normalization import CLIP, SEQUENCES, assert_same_weights, reference_step


def tiny_variant(model_type, seed, **extra):
    """A tiny LLaMA-family model of another shape, eager attention, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.presets import PRESETS

    fields = {k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **{**fields, "num_hidden_layers": 3, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def packed_batch(sequences):
    """One row holding several documents: positions restart at 0, no label crosses over."""
    ids, labels, positions = [], [], []
    for seq in sequences:
        ids += seq["input_ids"]
        labels += [-100] + seq["labels"][1:]
        positions += list(range(len(seq["input_ids"])))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def separate_loss(model, sequences):
    """The token-loss sum of each document on its own: what packing must reproduce."""
    total = 0.0
    for seq in sequences:
        summed, _ = next_token_loss(model, collate([seq]))
        total += float(summed)
    return total


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory, deepspeed_cpu_ops):
    tmp = tmp_path_factory.mktemp("pipeline")
    llama = save_hf_folder(tiny_llama(0), tmp / "hf-llama")
    docs = random_sequences(3, seed=11, min_len=6, max_len=16)
    variants = {
        "llama-tied": tiny_variant("llama", 1, tie_word_embeddings=True),
        "mistral-window": tiny_variant("mistral", 2, sliding_window=4),
        "qwen2": tiny_variant("qwen2", 3, rope_theta=1e6),
    }
    eval_cases, expected = [], {}
    for name, model in variants.items():
        folder = save_hf_folder(model, tmp / f"hf-{name}")
        if name == "qwen2":  # a pipeline folder: the stage reads only its own layer files
            from panda.models.pipeline_weights import hf_to_pipeline

            folder = str(hf_to_pipeline(folder, str(tmp / f"pipeline-{name}")))
        with torch.no_grad():
            expected[name] = separate_loss(model, docs)
        eval_cases.append({"name": name, "model": {"path": folder}, "backend": PIPELINE,
                           "batch": packed_batch(docs)})
    step_case = {"name": "step", "model": {"path": llama}, "clip": CLIP,
                 "backend": {**PIPELINE, "activation_checkpoint_interval": 1},
                 "micro_batches": [[s] for s in SEQUENCES]}
    mp.spawn(pipeline_worker, args=(2, free_port(), str(tmp), step_case, eval_cases), nprocs=2,
             join=True)
    return tmp, expected, docs


@pytest.mark.slow
def test_one_step_equals_a_plain_pytorch_step(pipelined):
    from safetensors.torch import load_file

    tmp, _, _ = pipelined
    ref_loss, ref_state = reference_step(CLIP)
    saved = torch.load(tmp / "step.pt", weights_only=True)
    assert saved["result"]["units"] == 30
    assert abs(saved["result"]["loss"] - ref_loss) <= 1e-5 * ref_loss
    assert_same_weights(load_file(tmp / "step" / "model.safetensors"), ref_state)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tied", "mistral-window", "qwen2"])
def test_pipelined_loss_equals_the_model_on_packed_documents(pipelined, name):
    tmp, expected, docs = pipelined
    saved = torch.load(tmp / f"{name}.pt", weights_only=True)
    assert saved["count"] == sum(sum(1 for x in d["labels"][1:] if x != -100) for d in docs)
    assert saved["sum"] == pytest.approx(expected[name], abs=1e-4)


def test_data_parallel_rank_layout_matches_deepspeed_topology():
    topology_module = pytest.importorskip("deepspeed.runtime.pipe.topology")
    PipeDataParallelTopology = topology_module.PipeDataParallelTopology

    # ds-pipeline computes stage and replica from the rank as DeepSpeed lays them out
    topology = PipeDataParallelTopology(num_pp=2, num_dp=3)
    for rank in range(6):
        coord = topology.get_coord(rank)
        assert divmod(rank, 3) == (coord.pipe, coord.data)


# -- the whole loop --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(pipeline_runs):
    return pipeline_runs


def history(tmp, name):
    return json.loads((tmp / f"{name}.json").read_text())["history"]


@pytest.mark.slow
def test_five_steps_match_a_single_process(trained):
    tmp, reference_losses, _ = trained
    assert [s["loss"] for s in history(tmp, "run")] == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.slow
def test_resume_from_the_pipeline_checkpoint_gives_the_same_losses(trained):
    tmp, _, _ = trained
    full, resumed = history(tmp, "run"), history(tmp, "run-resumed")
    assert [s["step"] for s in resumed] == [4, 5]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full[3:]], rel=1e-6)


@pytest.mark.slow
def test_export_has_the_trained_logits(trained):
    from transformers import AutoModelForCausalLM

    tmp, _, reference_final = trained
    batch = collate(random_sequences(3, seed=9))
    exported = AutoModelForCausalLM.from_pretrained(tmp / "run" / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_final).eval()
    with torch.no_grad():
        got = exported(input_ids=batch["input_ids"]).logits
        want = reference(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- what the recipe may ask for --------------------------------------------------------------

def recipe_error(backend, **sections):
    from panda import recipe as recipe_io
    from panda.errors import PandaError

    data = {"model": {"preset": "tiny-llama"},
            "data": {"sources": [{"name": "instruction", "path": "data.jsonl"}]},
            "backend": {"name": "ds-pipeline", **backend}, **sections}
    try:
        recipe_io.validate(data)
    except PandaError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("backend, sections, expected", [
    ({"zero_stage": 3}, {}, "backend.zero_stage: ZeRO-3 partitions gradients, which "
     "DeepSpeed's pipeline engine cannot do"),
    ({"zero_stage": 2}, {}, "backend.zero_stage: ZeRO-2 partitions gradients"),
    ({"zero_stage": 1, "offload_optimizer": "cpu"}, {"train": {"precision": "bf16"}},
     "backend.offload_optimizer: DeepSpeed cannot offload the optimizer of a pipeline in "
     "train.precision = \"bf16\""),
    ({}, {"lora": {}}, "[lora] does not work with backend 'ds-pipeline'"),
    ({}, {"train": {"precision": "fp32"}}, "backend.zero_stage: an fp32 pipeline needs "
     "zero_stage = 1"),
    ({}, {"method": {"name": "sft", "neftune_alpha": 5.0}}, "method.neftune_alpha: NEFTune"),
    ({}, {"model": {"preset": "phi3-mini"}}, "model: ds-pipeline supports llama, mistral and "
     "qwen2 models, not 'phi3'"),
    ({}, {"model": {"preset": "tiny-llama", "gradient_checkpointing": True}},
     "model.gradient_checkpointing: under ds-pipeline, use "
     "backend.activation_checkpoint_interval instead"),
    ({"partition_method": "random"}, {}, "backend.partition_method: unknown partition_method"),
])
def test_what_a_pipeline_cannot_honour_fails_validation(backend, sections, expected):
    error = recipe_error(backend, **sections)
    assert error is not None and expected in error, error


def test_a_pipeline_recipe_with_packing_validates():
    # position_ids travel with the activations, so packed documents stay apart
    assert recipe_error({"num_stages": 4, "zero_stage": 1, "activation_checkpoint_interval": 1},
                        data={"sources": [{"name": "instruction", "path": "d.jsonl"}],
                              "packing": True}) is None


def test_a_middle_stage_keeps_its_place_without_reading_rows():
    from panda.backends.ds_pipeline import skip_reading

    class Batches:
        def __init__(self):
            self.read = 0

        def _collate(self, sources, rows):
            self.read += 1

        def __iter__(self):
            for start in range(0, 6, 2):
                yield self._collate([0, 0], list(range(start, start + 2)))

    batches = Batches()
    skip_reading(batches)
    placeholders = list(batches)
    assert batches.read == 0 and len(placeholders) == 3
    assert placeholders[0]["input_ids"].shape == (2, 1)
    assert (placeholders[0]["labels"] == -100).all()


@pytest.mark.slow
def test_two_stages_by_two_replicas_match_a_single_process(tmp_path, deepspeed_cpu_ops,
                                                           single_process_run):
    reference_losses, _ = single_process_run
    run = {"model": {"path": save_hf_folder(tiny_llama(0), tmp_path / "hf")},
           "backend": PIPELINE,  # 2 stages; 4 ranks make 2 data-parallel replicas
           "train": {"gradient_accumulation_steps": 2, "max_steps": 5, "save_every": 0,
                     "per_device_batch_size": 2},  # 2 replicas x 2 = the reference's 4
           "output_dir": str(tmp_path / "run"), "summary": str(tmp_path / "run.json")}
    mp.spawn(pipeline_train_worker, args=(4, [free_port()], [run]), nprocs=4, join=True)
    losses = [s["loss"] for s in json.loads((tmp_path / "run.json").read_text())["history"]]
    assert losses == pytest.approx(reference_losses, rel=1e-5)

