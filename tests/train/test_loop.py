"""The engine loop end to end with stand-in parts: losses match a plain PyTorch loop,
checkpoints rotate, non-finite steps are skipped and then stop the run, the output
folder is protected."""

from __future__ import annotations

import json
import math

import pytest
import torch

import panda.job
from panda import recipe as recipe_io
from panda.errors import UsageError
from panda.train.checkpoint import complete_checkpoints
from panda.train.loop import TrainingDiverged
from standins import (ListBatches, StandinLm, next_token_loss, random_sequences,
                      register_standins, standin_build_data, standin_recipe_data, tiny_llama)


@pytest.fixture(autouse=True)
def standins(monkeypatch):
    register_standins()
    monkeypatch.setattr(panda.job, "build_data", standin_build_data(64))


def recipe(tmp_path, fused=False, momentum=0.0, **train):
    data = standin_recipe_data(str(tmp_path / "run"), **train)
    # fused: the update is skipped on the device, no host wait
    data["optim"].update(fused=fused, momentum=momentum)
    return recipe_io.validate(data)


# Both ways a step can skip a non-finite update: the host reads the loss and norm first
# (any optimizer), or torch's fused kernel skips it on the device (found_inf) and the loop
# reads the numbers one step later.
skip_on = pytest.mark.parametrize("fused", [False, True], ids=["host-check", "device-skip"])


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def plain_losses(steps, batch_size, accumulation, lr=0.05, clip=1.0):
    """The same training written as a plain PyTorch loop."""
    model = tiny_llama(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = ListBatches(random_sequences(64, seed=1), batch_size, seed=0)
    stream = iter(batches)
    losses = []
    for _ in range(steps):
        micro = []
        while len(micro) < accumulation:
            try:
                micro.append(next(stream))
            except StopIteration:
                stream = iter(batches)
        sums, counts = zip(*(next_token_loss(model, b) for b in micro))
        loss = sum(sums) / sum(int(c) for c in counts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


@skip_on
def test_losses_equal_a_plain_loop_across_epochs(tmp_path, fused):
    # 64 sequences / batch 4 = 16 micro-batches per epoch; 10 steps x 2 = 20: two epochs
    result = panda.job.train(recipe(tmp_path, fused, per_device_batch_size=4,
                                    gradient_accumulation_steps=2, max_steps=10, save_every=4,
                                    keep_last=2))
    expected, model = plain_losses(10, 4, 2)
    logged = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert result["step"] == 10 and not result["interrupted"]
    kept = [p.name for p in complete_checkpoints(tmp_path / "run")]
    assert kept == ["step-00000008", "step-00000010"]  # keep_last = 2; the end is saved
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name, value in model.state_dict().items():
        if name in exported:
            torch.testing.assert_close(exported[name], value, rtol=1e-5, atol=1e-7)


def test_epochs_decide_the_step_count(tmp_path):
    result = panda.job.train(recipe(tmp_path, per_device_batch_size=4,
                                    gradient_accumulation_steps=3, num_epochs=1))
    assert result["step"] == math.ceil(16 / 3)


class FlakyLm(StandinLm):
    """Returns a NaN loss on chosen steps (counted by calls to units())."""

    bad_steps: set[int] = set()

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = 0

    def units(self, batch):
        self.calls += 1
        return super().units(batch)

    def loss(self, model, batch):
        total, count, extra = super().loss(model, batch)
        if self.calls in self.bad_steps:
            total = total * float("nan")
        return total, count, extra


@skip_on
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, fused):
    panda.registry.register("method", "standin-lm", FlakyLm)
    FlakyLm.bad_steps = {3, 4}
    result = panda.job.train(recipe(tmp_path, fused, gradient_accumulation_steps=1,
                                    max_steps=6))
    assert result["nonfinite_steps"] == 2
    history = {h["step"]: h for h in result["history"]}
    assert math.isnan(history[3]["loss"]) and history[3]["nonfinite"] == 1.0
    assert math.isfinite(history[5]["loss"])
    assert all(torch.isfinite(v).all() for v in tiny_llama_loaded(tmp_path).values())


def tiny_llama_loaded(tmp_path):
    from safetensors.torch import load_file

    return load_file(tmp_path / "run" / "final" / "model.safetensors")


@skip_on
def test_a_run_of_nonfinite_steps_stops_without_saving(tmp_path, fused):
    panda.registry.register("method", "standin-lm", FlakyLm)
    FlakyLm.bad_steps = set(range(4, 100))
    with pytest.raises(TrainingDiverged, match=r"5 steps in a row \(up to step 8\)"):
        panda.job.train(recipe(tmp_path, fused, gradient_accumulation_steps=1, max_steps=20,
                                save_every=2))
    kept = [p.name for p in complete_checkpoints(tmp_path / "run")]
    assert kept == ["step-00000002"]  # step 4's save never happened: the update was NaN
    assert not (tmp_path / "run" / "final").exists()


def test_the_device_skip_equals_the_host_check(tmp_path):
    panda.registry.register("method", "standin-lm", FlakyLm)
    runs = {}
    for fused in (False, True):
        FlakyLm.bad_steps = {2, 5}
        result = panda.job.train(recipe(tmp_path / str(fused), fused, momentum=0.9,
                                        gradient_accumulation_steps=1, max_steps=7))
        runs[fused] = (result["history"], tiny_llama_loaded(tmp_path / str(fused)))
    (host_history, host_weights), (device_history, device_weights) = runs[False], runs[True]
    assert [h["nonfinite"] for h in device_history] == [0, 1, 0, 0, 1, 0, 0]
    for host, device in zip(host_history, device_history):
        assert device["loss"] == pytest.approx(host["loss"], rel=1e-6, nan_ok=True)
    for name, value in host_weights.items():
        torch.testing.assert_close(device_weights[name], value, rtol=1e-6, atol=1e-7)


@skip_on
def test_the_loop_reads_a_step_once_the_next_one_is_queued(tmp_path, monkeypatch, fused):
    import panda.backends.base
    import panda.train.loop

    queued, reads = [], []
    train_step = panda.backends.base.TorchBackend.train_step
    read = panda.train.loop.step_values_on_host

    def counting_train_step(self, micro_batches):
        queued.append(1)
        return train_step(self, micro_batches)

    def recording_read(values):
        reads.append((len(queued), isinstance(values["loss"], torch.Tensor)))
        return read(values)

    monkeypatch.setattr(panda.backends.base.TorchBackend, "train_step", counting_train_step)
    monkeypatch.setattr(panda.train.loop, "step_values_on_host", recording_read)
    panda.job.train(recipe(tmp_path, fused, max_steps=4, save_every=3))
    # Step k is read after step k + 1 was queued, except where a save (step 3) or the
    # end needs it at once; only the fused optimizer's steps come back as tensors.
    assert reads == [(2, fused), (3, fused), (3, fused), (4, fused)]


def test_non_empty_output_dir_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as error:
        panda.job.train(recipe(tmp_path, max_steps=1), resume="never")
    assert error.value.hint.startswith("add --overwrite")
    result = panda.job.train(recipe(tmp_path, max_steps=1), resume="never", overwrite=True)
    assert result["step"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # only panda's own outputs are replaced


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    # 16 micro-batches per epoch, 2 per step: step 8 ends epoch 0 exactly
    panda.job.train(recipe(tmp_path, per_device_batch_size=4, gradient_accumulation_steps=2,
                           max_steps=8))
    result = panda.job.train(recipe(tmp_path, per_device_batch_size=4,
                                    gradient_accumulation_steps=2, max_steps=12))
    expected, _ = plain_losses(12, 4, 2)
    logged = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert result["history"][0]["step"] == 9 and len(result["history"]) == 4


def test_resume_from_an_explicit_older_checkpoint_replaces_later_ones(tmp_path):
    settings = dict(per_device_batch_size=4, gradient_accumulation_steps=2, max_steps=10,
                    save_every=4, keep_last=3)
    panda.job.train(recipe(tmp_path, **settings))
    older = tmp_path / "run" / "checkpoints" / "step-00000004"
    result = panda.job.train(recipe(tmp_path, **settings), resume=str(older))
    assert [h["step"] for h in result["history"]] == [5, 6, 7, 8, 9, 10]
    expected, model = plain_losses(10, 4, 2)
    logged = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == pytest.approx(expected, rel=1e-5)  # steps 5-10 logged once, anew
    kept = [p.name for p in complete_checkpoints(tmp_path / "run")]
    assert kept == ["step-00000004", "step-00000008", "step-00000010"]
    with pytest.raises(UsageError, match="not a complete panda checkpoint"):
        panda.job.train(recipe(tmp_path, **settings), resume=str(tmp_path / "nowhere"))
