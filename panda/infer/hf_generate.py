"""Decoding through transformers' own ``generate``, streamed step by step.

panda's loop (``decode``) is the default. This path exists for models whose
forward panda's loop cannot drive (DeepSpeed's injected kernels keep their own
KV cache and expect ``generate``) and as the baseline of the benchmark. It
yields exactly what ``decode`` yields: per step, each row's new token or None.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

from panda.infer.decode import DecodeState, LENGTH, _finish_rows, left_pad, model_device, \
    token_budget
from panda.infer.sampling import Sampling

_DONE = object()


def _step_streamer() -> Any:
    """A transformers streamer that hands each step's (batch,) tokens to the consuming thread."""
    from transformers.generation.streamers import BaseStreamer

    class StepStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.steps: queue.Queue = queue.Queue()
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate first "puts" the prompt itself
                self.prompt_seen = True
                return
            self.steps.put(value.reshape(-1).tolist())

        def end(self) -> None:
            self.steps.put(_DONE)

    return StepStreamer()


def generate_steps(model: Any, prompts: list[list[int]], sampling: Sampling, *, pad_token_id: int,
                   eos_token_ids: set[int], context_length: int | None = None,
                   state: DecodeState | None = None, call: Any = None
                   ) -> Iterator[list[int | None]]:
    """Run ``(call or model.generate)`` in a thread; yield its tokens step by step."""
    import torch

    budget = token_budget(prompts, sampling, context_length)
    batch = len(prompts)
    state = state if state is not None else DecodeState([None] * batch, [len(p) for p in prompts])
    state.finish_reasons[:] = [None] * batch
    state.generated[:] = [0] * batch
    input_ids, attention_mask, _ = left_pad(prompts, pad_token_id, model_device(model))
    streamer = _step_streamer()
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=budget, pad_token_id=pad_token_id,
                                  streamer=streamer, do_sample=not sampling.greedy)
    if sampling.stop_at_eos:
        kwargs["eos_token_id"] = sorted(eos_token_ids)
    else:
        kwargs["min_new_tokens"] = budget
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    if sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = sampling.repetition_penalty
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                (call or model.generate)(**kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
        finally:
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    stop_ids = eos_token_ids if sampling.stop_at_eos else set()
    while (tokens := streamer.steps.get()) is not _DONE:
        yield _finish_rows(tokens, state, stop_ids)
    worker.join()
    if errors:
        raise errors[0]
    for row, reason in enumerate(state.finish_reasons):
        if reason is None:
            state.finish_reasons[row] = LENGTH
