"""Small, independent stand-ins for the engine tests: a tiny Llama, a plain next-token
loss, list-backed batches with resumable state, SGD and a constant schedule.

They implement the plugin and data interfaces the engine relies on, and nothing
more, so engine tests do not depend on the real plugins' choices.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from panda import registry
from panda.models.presets import PRESETS
from panda.plugins.api import MethodPlugin, ModelPlugin, OptimizerPlugin, Options, SchedulerPlugin

ROOT = Path(__file__).resolve().parents[2]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"})
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).float()


def next_token_loss(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies of logits[:, t] against labels[:, t+1], and their count."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                            ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


class StandinLm(MethodPlugin):
    """Next-token loss on labelled tokens."""

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch):
        total, count = next_token_loss(model, batch)
        return total, count, {}


class StandinModel(ModelPlugin):
    """The tiny Llama with a fixed seed; tokenizer from the repo."""

    def build(self, recipe):
        return tiny_llama(recipe.run.seed)

    def build_empty(self, recipe):
        with torch.device("meta"):  # what fsdp's other ranks build (backend.load_on_rank0)
            return tiny_llama(recipe.run.seed)

    def tokenizer(self, recipe):
        from panda.models import tiny_tokenizer

        return tiny_tokenizer.load()


class SgdOptions(Options):
    momentum: float = 0.0
    fused: bool = False  # torch's fused kernel: it skips a non-finite update on the device


class StandinSgd(OptimizerPlugin):
    """torch SGD: updates proportional to gradients, so a wrong scale shows."""

    Options = SgdOptions

    def build(self, param_groups, lr):
        return torch.optim.SGD(param_groups, lr=lr, momentum=self.options.momentum,
                               fused=self.options.fused or None)


class StandinConstant(SchedulerPlugin):
    """Constant after a linear warm-up."""

    def factor(self, step, total_steps, warmup_steps):
        return min(1.0, (step + 1) / (warmup_steps + 1))


def step_loss(backend: Any, micro_batches: list[dict]) -> float:
    """One ``train_step``; its loss on the host (a backend may return a device tensor)."""
    from panda.plugins.api import step_values_on_host

    return step_values_on_host(backend.train_step(micro_batches))["loss"]


def register_standins() -> None:
    registry.register("method", "standin-lm", StandinLm)
    registry.register("model", "standin-tiny", StandinModel)
    registry.register("optimizer", "standin-sgd", StandinSgd)
    registry.register("scheduler", "standin-constant", StandinConstant)


def random_sequences(count: int, seed: int = 0, min_len: int = 4, max_len: int = 24,
                     vocab: int = 512) -> list[dict[str, list[int]]]:
    """Token sequences of varied length; the first 1-3 tokens (a 'prompt') carry no loss."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(8, vocab) for _ in range(length)]
        prompt = rng.randint(1, 3)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate(sequences: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest; pads are labelled -100 (causal attention never sees them)."""
    width = max(len(s["input_ids"]) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq["input_ids"])
        ids[row, :n] = torch.tensor(seq["input_ids"])
        labels[row, :n] = torch.tensor(seq["labels"])
    positions = torch.arange(width).expand(len(sequences), width).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class ListBatches:
    """Shuffled per epoch, strided over ranks, resumable at any batch boundary."""

    def __init__(self, sequences, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.sequences = sequences
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self.batches_per_epoch = len(sequences) // (batch_size * world_size)

    def _order(self) -> list[int]:
        order = list(range(len(self.sequences)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def __iter__(self):
        order = self._order()
        while self.position < self.batches_per_epoch:
            start = self.position * self.batch_size * self.world_size
            chunk = order[start:start + self.batch_size * self.world_size]
            mine = chunk[self.rank::self.world_size]
            self.position += 1
            yield collate([self.sequences[i] for i in mine])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def standin_recipe_data(output_dir: str, **train: Any) -> dict:
    """A recipe (as data) that uses the stand-ins; ``train`` keys override [train]."""
    return {
        "run": {"name": "standin", "output_dir": output_dir, "seed": 0},
        "model": {"name": "standin-tiny"},
        "data": {"sources": [{"name": "instruction", "path": "unused.jsonl"}],
                 "max_seq_length": 32},
        "method": {"name": "standin-lm"},
        "optim": {"name": "standin-sgd", "lr": 0.05, "max_grad_norm": 1.0},
        "schedule": {"name": "standin-constant", "warmup_steps": 0},
        "train": {"per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                  "precision": "fp32", "log_every": 1, **train},
        "log": {"tensorboard": False},
    }


def standin_build_data(sequences_count: int = 64):
    """A replacement for panda.job.build_data that fills the job with ListBatches."""

    def build(job) -> None:
        recipe, dist = job.recipe, job.dist
        job.train_batches = ListBatches(random_sequences(sequences_count, seed=1),
                                        recipe.train.per_device_batch_size, dist.rank,
                                        dist.world_size, seed=recipe.run.seed)
        if recipe.train.eval_every:
            job.eval_batches = ListBatches(random_sequences(8, seed=2), 4, dist.rank,
                                           dist.world_size, shuffle=False)

    return build


# -- building a backend without the rest of a job --------------------------------------------

def backend_job(tmp: str, backend_name: str, *, batch_size: int, accumulation: int,
                max_grad_norm: float = 1.0, lr: float = 0.05, precision: str = "fp32",
                model: Any = None, compile: bool = False, optimizer: Any = None):
    """A Job around the tiny Llama with ``backend_name`` set up; no data attached."""
    from panda import recipe as recipe_io
    from panda.job import Job

    register_standins()
    data = standin_recipe_data(tmp, per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, precision=precision,
                               compile=compile)
    data["optim"].update(lr=lr, max_grad_norm=max_grad_norm)
    data["backend"] = {"name": backend_name}
    recipe = recipe_io.validate(data)
    backend = registry.get("backend", backend_name)(recipe.backend.options)
    dist = backend.init_distributed()
    job = Job(recipe=recipe, backend=backend, dist=dist, output_dir=Path(tmp),
              model=model if model is not None else tiny_llama(0), method=StandinLm(),
              optimizer_plugin=optimizer or StandinSgd(), schedule_plugin=StandinConstant(),
              total_steps=10)
    backend.setup(job)
    return job


def ddp_step_worker(rank: int, world_size: int, port: int, tmp: str, micro_batches: list,
                    batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """One DDP step on this rank's share; rank 0 writes loss and weights to tmp/ddp.pt."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    job = backend_job(tmp, "ddp", batch_size=batch_size, accumulation=accumulation,
                      max_grad_norm=max_grad_norm)
    result = job.backend.train_step([collate(mb) for mb in micro_batches[rank]])
    if rank == 0:
        torch.save({"result": result, "state": job.backend.unwrapped.state_dict()},
                   Path(tmp) / "ddp.pt")
    job.backend.close()
    exit_rank()


def exit_rank() -> None:
    """End a spawned rank whose results are on disk without the interpreter's teardown.

    gloo's worker threads occasionally abort a process while the interpreter tears down
    (SIGABRT, "terminate called without an active exception", seen about once in ten CI
    runs, with ddp and with DeepSpeed); that says nothing about what the rank computed.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
