"""The training loop: engine-agnostic, the same for every backend.

Per optimizer step it takes ``gradient_accumulation_steps`` micro-batches from
the data, hands them to ``backend.train_step`` and gets equal-on-every-rank
numbers back. Around that it keeps counters, evaluates, checkpoints, reports,
honours SIGTERM/SIGINT (finish the step, save, stop cleanly) and stops a run
whose loss keeps coming out non-finite before it can save broken weights.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from panda.errors import EXIT_FAILURE, PandaError
from panda.plugins.api import step_values_on_host
from panda.train.checkpoint import Checkpointer
from panda.train.metrics import MetricsLogger, Throughput, peak_memory_gb

NONFINITE_LIMIT = 5  # consecutive non-finite steps that stop the run


class TrainingDiverged(PandaError):
    """The loss was not finite for several steps in a row."""

    exit_code = EXIT_FAILURE


@dataclass
class TrainState:
    """Counters that a checkpoint carries and a resumed run continues."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    last_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    state: TrainState
    interrupted: bool = False
    checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class StopSignals:
    """SIGTERM / SIGINT ask the loop to stop after the current step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Runs ``job`` through its backend: steps, eval, checkpoints, metrics."""

    def __init__(self, job: Any, backend: Any, checkpointer: Checkpointer,
                 metrics: MetricsLogger, throughput: Throughput):
        self.job = job
        self.backend = backend
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.throughput = throughput
        self.train = job.recipe.train
        self.state = TrainState()
        self._batches: Iterator[dict[str, Any]] | None = None
        # The queued step whose numbers the host has not read yet:
        # (step, tokens seen, epoch, values)
        self._pending: tuple[int, int, int, dict[str, Any]] | None = None
        self._history: list[dict[str, Any]] = []

    def resume(self, checkpoint: str | Path) -> None:
        """Load a checkpoint: engine, data position, RNG (restored last), counters."""
        saved, data_state = self.checkpointer.load(checkpoint)
        self.job.train_batches.load_state_dict(data_state)
        known = TrainState.__dataclass_fields__
        self.state = TrainState(**{k: v for k, v in saved.items() if k in known})

    # -- data -----------------------------------------------------------------------------
    def next_micro_batches(self, count: int) -> list[dict[str, Any]]:
        batches = []
        empty_epochs = 0  # fresh iterators that yielded nothing, in a row
        while len(batches) < count:
            fresh = self._batches is None
            if fresh:
                self._batches = iter(self.job.train_batches)
            try:
                batches.append(next(self._batches))
                empty_epochs = 0
            except StopIteration:
                # One pass is over; a fresh iterator starts the next epoch. A resumed run
                # whose checkpoint sat at the very end of an epoch meets one empty pass first.
                self._batches = None
                empty_epochs += fresh
                if empty_epochs > 1:
                    raise PandaError("the training data yields no batches",
                                     hint="check data.sources and per_device_batch_size"
                                     ) from None
                self.state.epoch += 1
        return batches

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> FitResult:
        total = self.job.total_steps
        result = FitResult(self.state)
        self._history = result.history
        last_saved = self.state.step if self.state.step else None
        save_due = False
        with StopSignals() as stop:
            while self.state.step < total:
                self.one_step()
                step = self.state.step
                eval_due = bool(self.train.eval_every and step % self.train.eval_every == 0)
                stopping = self._agreed_stop(stop.requested)
                save_due = save_due or bool(self.train.save_every and
                                            step % self.train.save_every == 0)
                if eval_due or stopping or save_due:
                    self.finish_pending()  # what follows needs this step's numbers
                if eval_due:
                    self.evaluate()
                if stopping:
                    result.checkpoint = self.save()
                    result.interrupted = True
                    return result
                # Not in the middle of a non-finite streak: a run that diverges stops
                # with its last good checkpoint as the newest one.
                if save_due and not self.state.nonfinite_streak:
                    result.checkpoint = self.save()
                    last_saved, save_due = step, False
            self.finish_pending()
            if self.train.eval_every and self.state.step % self.train.eval_every:
                self.evaluate()
            if last_saved != self.state.step:
                result.checkpoint = self.save()
        return result

    def one_step(self) -> None:
        """Queue one optimizer step, then account for the step before it.

        A backend may return the step's numbers as device tensors still being
        computed (see ``TrainBackend.train_step``). Reading them at once would leave
        the device idle while the host prepares the next step; reading the previous
        step's numbers after this one is queued costs no wait at all.
        """
        from panda.data.batches import sequence_length

        micro_batches = self.next_micro_batches(self.train.gradient_accumulation_steps)
        epoch = self.state.epoch  # the epoch these batches came from
        values = self.backend.train_step(micro_batches)
        self.finish_pending()
        self.state.step += 1
        self.state.tokens_seen += int(values["tokens"])
        self.throughput.add(int(values["tokens"]), sequence_length(micro_batches[0]))
        self._pending = (self.state.step, self.state.tokens_seen, epoch, values)

    def finish_pending(self) -> None:
        """Read, check and log the queued step's numbers (if any) on the host."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, tokens_seen, epoch, values = pending
        values = step_values_on_host(values)
        self._track_nonfinite(step, values)
        self.state.last_loss = values["loss"]
        logged = None
        if step % self.train.log_every == 0 or step == self.job.total_steps or step == 1:
            logged = {"loss": values["loss"], "grad_norm": values["grad_norm"],
                      "lr": values["lr"], **self.throughput.report(),
                      "peak_mem_gb": peak_memory_gb(self.job.dist.device),
                      "tokens_seen": tokens_seen, "epoch": epoch,
                      **{k: v for k, v in values.items() if k not in _STEP_KEYS}}
            if self.state.nonfinite_steps:
                logged["nonfinite_steps"] = self.state.nonfinite_steps
        self.metrics.step(step, logged)
        self._history.append({"step": step, **values})

    def _track_nonfinite(self, step: int, values: dict[str, float]) -> None:
        if not values.get("nonfinite"):
            self.state.nonfinite_streak = 0
            return
        self.state.nonfinite_steps += 1
        self.state.nonfinite_streak += 1
        self.metrics.message(f"step {step}: loss or gradients not finite "
                             f"(loss {values['loss']}, grad norm {values['grad_norm']}); "
                             "update skipped")
        if self.state.nonfinite_streak >= NONFINITE_LIMIT:
            raise TrainingDiverged(
                f"the loss was not finite for {NONFINITE_LIMIT} steps in a row (up to step "
                f"{step}); stopped without saving",
                hint="lower optim.lr, set optim.max_grad_norm, or use precision bf16 instead "
                "of fp16; resume from the last checkpoint with --resume auto")

    def _agreed_stop(self, requested: bool) -> bool:
        """Every rank must stop at the same step, or the next collective hangs."""
        if self.job.dist.world_size == 1:
            return requested
        return self.backend.all_reduce_sum([1.0 if requested else 0.0])[0] > 0

    def evaluate(self) -> dict[str, float]:
        loss_sum, units = 0.0, 0
        for batch in self.job.eval_batches:
            batch_sum, batch_units = self.backend.eval_step(batch)
            loss_sum += batch_sum
            units += batch_units
        loss_sum, units = self.backend.all_reduce_sum([loss_sum, units])
        loss = loss_sum / units if units else float("nan")
        values = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        self.state.last_eval = values
        self.metrics.eval(self.state.step, values)
        return values

    def save(self) -> Path:
        state = asdict(self.state)
        return self.checkpointer.save(self.state.step, state,
                                      self.job.train_batches.state_dict())


_STEP_KEYS = {"loss", "grad_norm", "lr", "tokens", "units", "nonfinite"}
