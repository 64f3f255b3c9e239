"""Micro-batches for training and evaluation, per data-parallel rank (the batch contract).

See ``panda.data`` for the keys of a batch. Rows are cut into steps of
``batch_size * world_size`` samples; in each step rank ``r`` takes the r-th
slice, so ranks are disjoint and together cover every sample. The last step
of an epoch may hold fewer samples: they are spread over the ranks as evenly
as possible, and a rank left with none gets a batch of one padding row whose
labels are all -100 (it adds nothing to the loss or the token count, and
keeps every rank doing the same number of forward passes, so DDP never hangs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from panda.data.mixing import MixingOrder
from panda.errors import PandaError

if TYPE_CHECKING:
    from panda.data.prepared import PreparedData

IGNORE = -100
PAD_MULTIPLE = 8


class _Batches:
    def __init__(self, prepared: "PreparedData", batch_size: int, rank: int, world_size: int):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.prepared = prepared
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def _rank_slice(self, start: int, end: int) -> tuple[int, int]:
        """This rank's part of samples [start, end) of one step."""
        count = end - start
        if count == self.batch_size * self.world_size:
            first = start + self.rank * self.batch_size
            return first, first + self.batch_size
        base, extra = divmod(count, self.world_size)  # a short last step: spread it evenly
        first = start + self.rank * base + min(self.rank, extra)
        return first, first + base + (1 if self.rank < extra else 0)

    def _collate(self, sources: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.prepared.data_format == "pair":
            return collate_pairs(self.prepared, sources, rows)
        return collate_rows(self.prepared, sources, rows)


class TrainBatches(_Batches):
    """This rank's training micro-batches, epoch after epoch, resumable to the sample.

    Iterating yields the rest of the current epoch, then moves to the next:
    ``for epoch in range(n): for batch in batches: ...`` trains n epochs, and
    a resumed object continues mid-epoch. ``epoch`` can also be set directly
    (that starts the epoch from its beginning). ``state_dict()`` counts every
    batch handed out so far; ``load_state_dict`` restores it, so the resumed
    run yields exactly the batches the interrupted one had not yet yielded.
    """

    def __init__(self, prepared: "PreparedData", *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 42):
        super().__init__(prepared, batch_size, rank, world_size)
        self.seed = seed
        self.order = MixingOrder([s.plan.num_rows for s in prepared.sources],
                                 [s.weight for s in prepared.sources], seed)
        self.samples_per_epoch = self.order.epoch_size
        self.batches_per_epoch = math.ceil(self.samples_per_epoch / (batch_size * world_size))
        self._epoch = 0
        self._position = 0  # samples (of all ranks) handed out in this epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch, self._position = int(value), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sources, rows = self.order.epoch(self._epoch)
        step_size = self.batch_size * self.world_size
        while self._position < self.samples_per_epoch:
            start = self._position
            end = min(start + step_size, self.samples_per_epoch)
            first, last = self._rank_slice(start, end)
            self._position = end  # before yielding: a checkpoint saved now resumes after it
            yield self._collate(sources[first:last], rows[first:last])
        self._epoch, self._position = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        epoch, position = self._epoch, self._position
        if position >= self.samples_per_epoch:  # the epoch's last batch is out: next one
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "samples_per_epoch": self.samples_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("samples_per_epoch") != self.samples_per_epoch or state.get("seed") != self.seed:
            raise PandaError(
                f"the data changed since the checkpoint: it had {state.get('samples_per_epoch')} "
                f"samples per epoch with seed {state.get('seed')}, now {self.samples_per_epoch} "
                f"with seed {self.seed}",
                hint="resume with the same data and recipe, or start a new run")
        step_size = self.batch_size * self.world_size
        position = int(state["position"])
        # Another batch size or world size continues at the next whole step.
        self._epoch = int(state["epoch"])
        self._position = min(math.ceil(position / step_size) * step_size, self.samples_per_epoch)


class EvalBatches(_Batches):
    """This rank's evaluation micro-batches: every eval row once, in a fixed order."""

    def __init__(self, prepared: "PreparedData", *, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(prepared, batch_size, rank, world_size)
        self.sources = np.concatenate([np.full(s.plan.num_rows, i, dtype=np.int64)
                                       for i, s in enumerate(prepared.sources)] or
                                      [np.zeros(0, dtype=np.int64)])
        self.rows = np.concatenate([np.arange(s.plan.num_rows, dtype=np.int64)
                                    for s in prepared.sources] or [np.zeros(0, dtype=np.int64)])
        self.num_batches = math.ceil(len(self.rows) / (batch_size * world_size))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step_size = self.batch_size * self.world_size
        for start in range(0, len(self.rows), step_size):
            first, last = self._rank_slice(start, min(start + step_size, len(self.rows)))
            yield self._collate(self.sources[first:last], self.rows[first:last])


# -- collation --------------------------------------------------------------------------------

def _padded_length(longest: int, max_seq_length: int) -> int:
    """The longest row rounded up to a multiple of 8 (tensor-core friendly), capped so
    rounding never exceeds max_seq_length when the row itself fits in it."""
    rounded = -(-max(longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE
    return rounded if longest > max_seq_length else min(rounded, max_seq_length)


def packed_row(prepared: "PreparedData", source: int, row: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(input ids, labels, position ids, documents) of one packed row, unpadded.

    Labels are the ids where the loss mask is 1, else -100; the first token of
    every document is -100 (nothing in its own document predicts it), so no
    label crosses a document boundary. Positions restart at 0 per document.
    """
    data = prepared.sources[source]
    docs = data.plan.row(row)
    pieces = [data.store.document(int(d)) for d in docs]
    ids = np.concatenate([p[0] for p in pieces]).astype(np.int64)
    mask = np.concatenate([p[1] for p in pieces])
    lengths = np.fromiter((len(p[0]) for p in pieces), dtype=np.int64, count=len(pieces))
    starts = np.zeros(len(pieces), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    labels = np.where(mask.astype(bool), ids, IGNORE)
    labels[starts] = IGNORE
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)
    return ids, labels, positions, len(pieces)


def collate_rows(prepared: "PreparedData", sources: np.ndarray, rows: np.ndarray
                 ) -> dict[str, torch.Tensor]:
    """An ``lm`` batch: [B, T] rows, or one [1, N] row in the flat layout.

    Padding continues the positions of the row's last document instead of
    restarting them, so a row holding one document needs no block mask (SDPA
    keeps its fast causal path); padding sits after every real token, so no
    real token can attend to it, and its labels are -100.
    """
    built = [packed_row(prepared, int(s), int(r)) for s, r in zip(sources, rows)]
    if not built:  # this rank has nothing in the last step: one row of padding
        built = [(np.full(1, prepared.pad_id, dtype=np.int64), np.full(1, IGNORE, dtype=np.int64),
                  np.zeros(1, dtype=np.int64), 0)]
        sources = np.full(1, -1, dtype=np.int64)
    if prepared.layout == "flat":
        built = [(np.concatenate([b[0] for b in built]), np.concatenate([b[1] for b in built]),
                  np.concatenate([b[2] for b in built]), sum(b[3] for b in built))]
        length = -(-len(built[0][0]) // PAD_MULTIPLE) * PAD_MULTIPLE
    else:
        length = _padded_length(max(len(b[0]) for b in built), prepared.max_seq_length)
    count = len(built)
    input_ids = np.full((count, length), prepared.pad_id, dtype=np.int64)
    labels = np.full((count, length), IGNORE, dtype=np.int64)
    positions = np.empty((count, length), dtype=np.int64)
    for index, (ids, row_labels, row_positions, _) in enumerate(built):
        n = len(ids)
        input_ids[index, :n] = ids
        labels[index, :n] = row_labels
        positions[index, :n] = row_positions
        next_position = row_positions[-1] + 1 if n else 0
        positions[index, n:] = np.arange(next_position, next_position + length - n)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(positions),
             "_num_docs": torch.tensor([b[3] for b in built], dtype=torch.long)}
    if prepared.layout != "flat":
        batch["_source"] = torch.as_tensor(np.asarray(sources, dtype=np.int64))
    return batch


def collate_pairs(prepared: "PreparedData", sources: np.ndarray, rows: np.ndarray
                  ) -> dict[str, torch.Tensor]:
    """A ``pair`` batch: chosen and rejected sides of the same pairs, right-padded to one T."""
    pairs = []
    for source, row in zip(sources, rows):
        data = prepared.sources[int(source)]
        doc = int(data.plan.row(int(row))[0])
        pairs.append({side: data.store.document(doc, f"{side}_") for side in ("chosen", "rejected")})
    real = len(pairs)
    # Where each pair comes from (source index, row of that source's plan; -1 for the padding
    # pair), so per-pair values computed before training (DPO's reference log-probs) can be
    # looked up.
    origin = {"_source": [int(s) for s in sources] or [-1], "_row": [int(r) for r in rows] or [-1]}
    if not pairs:
        empty = (np.full(1, prepared.pad_id, dtype=np.int64), np.zeros(1, dtype=np.uint8))
        pairs = [{"chosen": empty, "rejected": empty}]
    longest = max(len(p[side][0]) for p in pairs for side in ("chosen", "rejected"))
    length = _padded_length(longest, prepared.max_seq_length)
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        input_ids = np.full((len(pairs), length), prepared.pad_id, dtype=np.int64)
        labels = np.full((len(pairs), length), IGNORE, dtype=np.int64)
        attention = np.zeros((len(pairs), length), dtype=np.int64)
        for index, pair in enumerate(pairs[:real]):
            ids, mask = pair[side]
            n = len(ids)
            input_ids[index, :n] = ids
            labels[index, :n] = np.where(mask.astype(bool), ids, IGNORE)
            attention[index, :n] = 1
        if not real:
            attention[0, 0] = 1  # a padding pair still needs one visible token
        batch[f"{side}_input_ids"] = torch.from_numpy(input_ids)
        batch[f"{side}_labels"] = torch.from_numpy(labels)
        batch[f"{side}_attention_mask"] = torch.from_numpy(attention)
    batch["_num_pairs"] = torch.tensor(real, dtype=torch.long)
    batch.update({key: torch.tensor(values, dtype=torch.long) for key, values in origin.items()})
    return batch


def token_slots(batch: dict[str, Any]) -> int:
    """Token positions in a batch, padding included: ``input_ids``, or both sides of a pair."""
    return sum(int(value.numel()) for key, value in batch.items()
               if key.endswith("input_ids") and not key.startswith("_"))


def sequence_length(batch: dict[str, Any]) -> int:
    """The batch's row length T (for pair batches, that of the chosen/rejected rows)."""
    return max(int(value.shape[-1]) for key, value in batch.items()
               if key.endswith("input_ids") and not key.startswith("_"))


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``model(**...)`` of an ``lm`` batch.

    Every key not starting with "_" other than labels, plus ``use_cache=False``:
    transformers (5.x, masking_utils) derives the per-document mask from
    position_ids only when no KV cache exists, and a model whose config says
    ``use_cache=True`` builds one even in training, silently letting packed
    documents attend to each other.
    """
    inputs = {k: v for k, v in batch.items() if not k.startswith("_") and k != "labels"}
    inputs["use_cache"] = False
    return inputs
