"""The data pipeline: records -> validated -> tokenized (cached) -> packed -> batches.

Usage (what ``panda.job`` does)::

    prepared = panda.data.prepare(recipe, tokenizer, split="train", data_format="lm")
    batches = panda.data.TrainBatches(prepared, batch_size=B, rank=r, world_size=W, seed=42)
    for epoch in range(epochs):
        for batch in batches:            # this rank's micro-batches of one epoch
            loss = model(**panda.data.model_inputs(batch)) ...

``prepare(recipe, tokenizer, *, split="train"|"eval", data_format="lm"|"pair")``
reads every source, validates records (``path:line`` errors), tokenizes into
the cache (``$PANDA_CACHE``, default ``~/.cache/panda/data``) and packs. Under
torchrun the first process of each node builds the cache while the others
wait for it on the file system, never in a collective with a timeout.

The batch contract (``lm`` data)
--------------------------------
Every batch is a dict of torch tensors:

* ``input_ids``  LongTensor[B, T]: B packed rows; T is the longest row of the
  batch rounded up to a multiple of 8 (never above max_seq_length when rows fit).
* ``labels``     LongTensor[B, T]: NOT shifted (the loss compares
  ``logits[:, t]`` with ``labels[:, t + 1]``); -100 = no loss: on prompt,
  system and user tokens, on padding, and on the first token of every packed
  document, so no label crosses a document boundary.
* ``position_ids`` LongTensor[B, T]: restart at 0 at each packed document;
  padding continues the positions of the row's last document.
* ``_num_docs`` LongTensor[B] (documents per row) and ``_source``
  LongTensor[B] (index of the row's source, -1 for a padding row): metadata.

Keys starting with "_" are metadata; every other key but ``labels`` goes to
``model(...)``. No ``attention_mask`` is sent: with ``attention_mask=None``
transformers builds the block-diagonal causal mask from ``position_ids``
(sdpa, eager, flex_attention), which keeps packed documents apart. It does
so only without a KV cache, so the forward must run with ``use_cache=False``:
``model_inputs(batch)`` adds it. With ``model.attn = "flash_attention_2"``,
whose packed path needs a single row, each batch is one ``[1, N]`` row of all
this rank's packed rows back to back (``prepared.layout == "flat"``).

``pair`` data (preference methods): ``chosen_input_ids``, ``chosen_labels``,
``chosen_attention_mask``, ``rejected_input_ids``, ``rejected_labels``,
``rejected_attention_mask``, all [B, T] and right-padded to one T, prompt
labels -100; ``_num_pairs`` (a scalar); ``_source`` and ``_row`` LongTensor[B]
(each pair's source index and row in that source's split, -1 for a padding
pair). A pair is never split across
micro-batches or ranks, and pairs are never packed.

Iteration
---------
``TrainBatches`` yields this rank's micro-batches of the current epoch, then
advances the epoch; the order is a pure function of the seed, so
``state_dict()``/``load_state_dict()`` resume at the exact sample.
``batches_per_epoch`` is the same on every rank; a rank without samples in
the last step gets one all-padding row (labels all -100). ``EvalBatches``
covers the eval data once, in a fixed order.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare", "PreparedData", "TrainBatches", "EvalBatches", "model_inputs",
           "load_tokenizer"]

_HOMES = {"prepare": "panda.data.prepared", "PreparedData": "panda.data.prepared",
          "load_tokenizer": "panda.data.prepared", "TrainBatches": "panda.data.batches",
          "EvalBatches": "panda.data.batches", "model_inputs": "panda.data.batches"}


def __getattr__(name: str) -> Any:
    # Lazy: plugin modules import panda.data.readers, which must not pull in torch.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'panda.data' has no attribute {name!r}")


# Attention implementations that keep packed documents apart, and how; HFModel.check_recipe
# rejects packing with any other. Kept here (no imports) so recipe validation stays light.
PACKING_ATTENTION: dict[str, str] = {
    "sdpa": "block-diagonal causal mask built by transformers from position_ids",
    "eager": "block-diagonal causal mask built by transformers from position_ids",
    "flex_attention": "block mask built by transformers from position_ids",
    "flash_attention_2": "variable-length kernel on one flat row, cut where position_ids is 0",
}
