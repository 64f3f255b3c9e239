"""Best-fit-decreasing packing of documents into rows of ``max_seq_length`` tokens.

Documents are placed longest first, each into the open row whose free space
fits it most tightly, else into a new row. On long-tailed length distributions
this fills rows to 98-99% (tests and ``docs/data.md`` give the figures), where
padding every document to the maximum length wastes most of each row.

A plan is CSR-shaped: row ``r`` holds documents ``docs[starts[r]:starts[r+1]]``.
Packing only decides *which* documents share a row; keeping them apart in
attention is the batch's job (position ids restart per document, see
``panda.data.batches``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackPlan:
    """Rows of documents: ``docs[starts[r]:starts[r + 1]]`` are the documents of row r."""

    docs: np.ndarray  # int64 document indices
    starts: np.ndarray  # int64, len(rows) + 1

    @property
    def num_rows(self) -> int:
        return len(self.starts) - 1

    def row(self, index: int) -> np.ndarray:
        return self.docs[self.starts[index]:self.starts[index + 1]]

    @classmethod
    def one_per_row(cls, documents: np.ndarray) -> "PackPlan":
        documents = np.asarray(documents, dtype=np.int64)
        return cls(documents, np.arange(len(documents) + 1, dtype=np.int64))


def pack_best_fit(lengths: np.ndarray, capacity: int, documents: np.ndarray | None = None
                  ) -> PackPlan:
    """Best-fit-decreasing rows of at most ``capacity`` tokens.

    ``lengths[i]`` is the length of ``documents[i]`` (default: document i);
    every length must be in 1..capacity. Deterministic: ties keep input order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    documents = np.arange(len(lengths)) if documents is None else np.asarray(documents)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"document lengths must be in 1..{capacity}")
    order = np.argsort(-lengths, kind="stable")
    # rows_with_space[s]: open rows with exactly s tokens free; has_space marks the non-empty s
    rows_with_space: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_space = np.zeros(capacity + 1, dtype=bool)
    space_of_row: list[int] = []
    row_of_doc = np.empty(len(lengths), dtype=np.int64)
    for position in order:
        length = int(lengths[position])
        fits = has_space[length:]
        best = int(fits.argmax())
        if fits[best]:
            space = length + best
            row = rows_with_space[space].pop()
            if not rows_with_space[space]:
                has_space[space] = False
        else:
            row = len(space_of_row)
            space_of_row.append(capacity)
            space = capacity
        left = space - length
        space_of_row[row] = left
        row_of_doc[position] = row
        if left > 0:
            rows_with_space[left].append(row)
            has_space[left] = True
    # Group documents by row, rows in creation order, documents in placement order.
    placement = order[np.argsort(row_of_doc[order], kind="stable")]
    counts = np.bincount(row_of_doc, minlength=len(space_of_row))
    starts = np.zeros(len(space_of_row) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return PackPlan(documents[placement].astype(np.int64), starts)


def packing_efficiency(lengths: np.ndarray, plan: PackPlan, capacity: int) -> float:
    """Share of the row slots holding tokens (1.0 = no padding at all)."""
    slots = plan.num_rows * capacity
    return float(np.asarray(lengths).sum()) / slots if slots else 1.0


def padding_efficiency(lengths: np.ndarray, capacity: int) -> float:
    """The same share when every document is padded to ``capacity`` (no packing)."""
    lengths = np.asarray(lengths)
    return float(lengths.sum()) / (len(lengths) * capacity) if len(lengths) else 1.0
