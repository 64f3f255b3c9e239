"""The backend switches the whole model to train mode for a step after evaluation (and on the
first step), but does not walk every module again on each step while it stays in train mode."""

from __future__ import annotations

from standins import backend_job, collate, random_sequences


def modes(model) -> set[bool]:
    return {module.training for module in model.modules()}


def test_train_steps_run_in_train_mode_and_evaluation_in_eval_mode(tmp_path, monkeypatch):
    job = backend_job(str(tmp_path), "single", batch_size=4, accumulation=1)
    backend, batch = job.backend, collate(random_sequences(4, seed=3))
    backend.model.eval()  # as loaded: from_pretrained returns a model in eval mode
    backend.train_step([batch])
    assert modes(backend.model) == {True}
    walks = []
    original_train = type(backend.model).train
    monkeypatch.setattr(type(backend.model), "train",
                        lambda self, mode=True: walks.append(mode) or original_train(self, mode))
    backend.train_step([batch])
    assert walks == []  # already in train mode: no second walk
    backend.eval_step(batch)
    assert modes(backend.model) == {False}
    backend.train_step([batch])
    assert modes(backend.model) == {True} and walks == [False, True]  # eval(), then train()
