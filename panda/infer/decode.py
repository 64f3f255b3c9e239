"""Token-by-token decoding of one batch of prompts with a KV cache.

One loop serves every backend (hf, torch-tp, ds): it only calls the model's
forward. Prompts are left-padded so every row's next token sits in the last
column; the attention mask hides the padding and position ids restart at 0 on
each row's first real token, so a padded row computes what it would alone.

Two ways to hold the KV cache:

* dynamic (transformers' ``DynamicCache``): grows by concatenation; any shape,
  any device. The default on CPU and for models that cannot be compiled.
* static (:class:`StaticDecoding`): a ``StaticCache`` of fixed size plus a
  ``torch.compile``-d decode step (mode ``reduce-overhead`` = CUDA graphs), so a
  step is one graph replay instead of hundreds of kernel launches from Python.
  Prefill runs eagerly (its shape changes with every batch).

The host reads each step's tokens (for streaming and end-of-sequence checks)
one step late: the copy to pinned memory is queued, the next forward is
launched, and only then does the host wait for the copy, so the GPU never
idles while Python decides what to print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from panda.errors import UsageError
from panda.infer.sampling import Sampling, pick_next_tokens

if TYPE_CHECKING:
    import torch

STOP = "stop"  # the model produced an end-of-sequence token
LENGTH = "length"  # max_new_tokens (or the context length) was reached


@dataclass
class DecodeState:
    """Per-row outcome, filled in while decoding; read it once the iterator is exhausted."""

    finish_reasons: list[str | None]
    prompt_lengths: list[int]
    generated: list[int] = field(default_factory=list)  # tokens produced per row


def model_device(model: Any) -> "torch.device":
    """Where input ids must go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device


def left_pad(prompts: list[list[int]], pad_token_id: int, device: Any
             ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(input_ids, attention_mask, position_ids), each (batch, longest prompt)."""
    import torch

    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def token_budget(prompts: list[list[int]], sampling: Sampling, context_length: int | None) -> int:
    """New tokens this batch may produce: max_new_tokens, cut to fit the context window."""
    longest = max(len(p) for p in prompts)
    if context_length is None:
        return sampling.max_new_tokens
    room = context_length - longest
    if room < 1:
        raise UsageError(f"a prompt has {longest} tokens, which fills the model's context of "
                         f"{context_length} tokens", hint="shorten the prompt")
    return min(sampling.max_new_tokens, room)


class StaticDecoding:
    """Static KV cache + compiled decode step, reused across batches of the same shape.

    One ``StaticCache`` per (batch size, cache length bucket) is kept and reset
    between batches: the compiled step closes over it, and reusing the same
    object keeps the compiled graph (and its CUDA graph) valid.
    """

    BUCKET = 256  # cache lengths are rounded up to a multiple of this to limit recompiles

    def __init__(self, model: Any, *, compile: bool = True, mode: str = "reduce-overhead",
                 fullgraph: bool = False):
        self.model = model
        self.compile = compile
        self.mode = mode
        self.fullgraph = fullgraph
        self._caches: dict[tuple[int, int], Any] = {}
        self._steps: dict[tuple[int, int], Callable] = {}

    @staticmethod
    def supported(model: Any) -> bool:
        """Whether the architecture declares a compile-safe forward (transformers' flag)."""
        return bool(getattr(model, "_can_compile_fullgraph", False))

    def prepare(self, batch_size: int, length: int) -> tuple[Any, Callable]:
        """(cache, step function) for this batch, the cache emptied."""
        import torch
        from transformers import StaticCache

        bucket = -(-length // self.BUCKET) * self.BUCKET
        key = (batch_size, bucket)
        if key not in self._caches:
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            model = self.model

            def step(input_ids, position_ids, attention_mask):
                out = model(input_ids=input_ids, position_ids=position_ids,
                            attention_mask=attention_mask, cache=cache, use_cache=True)
                return out.logits[:, -1, :]

            self._caches[key] = cache
            self._steps[key] = (torch.compile(step, mode=self.mode, fullgraph=self.fullgraph)
                                if self.compile else step)
        cache = self._caches[key]
        cache.reset()
        return cache, self._steps[key]

    @staticmethod
    def cache_length(cache: Any) -> int:
        return cache.layers[0].max_cache_len


def decode(model: Any, prompts: list[list[int]], sampling: Sampling, *, pad_token_id: int,
           eos_token_ids: set[int], context_length: int | None = None,
           static: StaticDecoding | None = None,
           agree: Callable[["torch.Tensor"], "torch.Tensor"] | None = None,
           state: DecodeState | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once that row has finished).

    ``agree`` makes every tensor-parallel rank use the same tokens (a broadcast
    from rank 0); ``state`` receives finish reasons and counts.
    """
    import torch
    from transformers import DynamicCache

    batch = len(prompts)
    budget = token_budget(prompts, sampling, context_length)
    state = state if state is not None else DecodeState([None] * batch, [len(p) for p in prompts])
    state.finish_reasons[:] = [None] * batch
    state.prompt_lengths[:] = [len(p) for p in prompts]
    state.generated[:] = [0] * batch
    device = model_device(model)
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_token_id, device)
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stop_ids = eos_token_ids if sampling.stop_at_eos else set()

    with torch.inference_mode():
        if static is not None:
            cache, step = static.prepare(batch, input_ids.shape[1] + budget)
            # The decode step sees a mask over the whole cache: padding stays hidden, and the
            # causal mask hides the slots not written yet. A fixed shape keeps the graph static.
            full_mask = torch.ones((batch, static.cache_length(cache)), dtype=torch.long,
                                   device=device)
            full_mask[:, :attention_mask.shape[1]] = attention_mask
        else:
            cache, step = DynamicCache(config=model.config), None
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1, :]
        seen = _seen_tokens(prompts, logits.shape[-1], device) \
            if sampling.repetition_penalty != 1.0 else None
        next_positions = position_ids[:, -1:] + 1
        reader = _TokenReader(batch, device)

        tokens = _choose(logits, sampling, seen, generator, agree)
        for index in range(budget):
            reader.queue(tokens)
            last_step = index == budget - 1
            if not last_step:  # launch the next forward before the host waits for `tokens`
                if seen is not None:
                    seen.scatter_(1, tokens[:, None], True)
                feed = tokens[:, None]
                if static is not None:
                    torch.compiler.cudagraph_mark_step_begin()
                    logits = step(feed, next_positions, full_mask)
                else:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], -1)
                    logits = model(input_ids=feed, attention_mask=attention_mask,
                                   position_ids=next_positions, cache=cache,
                                   use_cache=True).logits[:, -1, :]
                next_positions = next_positions + 1
            row_tokens = _finish_rows(reader.read(), state, stop_ids)
            yield row_tokens
            if all(reason is not None for reason in state.finish_reasons):
                return
            if not last_step:
                tokens = _choose(logits, sampling, seen, generator, agree)
        for row, reason in enumerate(state.finish_reasons):
            if reason is None:
                state.finish_reasons[row] = LENGTH


def _choose(logits, sampling, seen, generator, agree):
    tokens = pick_next_tokens(logits, sampling, seen=seen, generator=generator)
    return agree(tokens) if agree is not None else tokens


def _finish_rows(tokens: list[int], state: DecodeState, stop_ids: set[int]) -> list[int | None]:
    """Mark rows that just produced an end-of-sequence token; None for finished rows."""
    out: list[int | None] = []
    for row, token in enumerate(tokens):
        if state.finish_reasons[row] is not None:
            out.append(None)
        elif token in stop_ids:
            state.finish_reasons[row] = STOP
            out.append(None)
        else:
            state.generated[row] += 1
            out.append(token)
    return out


def _seen_tokens(prompts: list[list[int]], vocab: int, device: Any) -> "torch.Tensor":
    import torch

    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        seen[row, torch.tensor(prompt, dtype=torch.long)] = True
    return seen.to(device)


class _TokenReader:
    """Copies a step's tokens to the host without waiting for work queued after them."""

    def __init__(self, batch: int, device: Any):
        import torch

        self.on_cuda = getattr(device, "type", str(device)) == "cuda"
        self.host = torch.empty(batch, dtype=torch.long, pin_memory=self.on_cuda)
        self.event = torch.cuda.Event() if self.on_cuda else None

    def queue(self, tokens: "torch.Tensor") -> None:
        self.host.copy_(tokens, non_blocking=self.on_cuda)
        if self.event is not None:
            self.event.record()

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
