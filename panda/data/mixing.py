"""Weighted, deterministic, resumable order of rows drawn from several sources.

An epoch is as many samples as all sources have rows together. Source ``s``
gets ``round(N * w_s / sum(w))`` of them (largest remainders, so the counts sum
to N exactly), and the epoch's sequence of sources is a seeded shuffle of those
counts: the proportions are exact in every epoch, the order random. Each
source is an endless stream of its rows, reshuffled every time it is used up,
so a small source with a large weight repeats and a large one with a small
weight is seen a little more each epoch; with weights proportional to sizes
(or a single source) every row comes exactly once per epoch.

Everything is a pure function of (seed, epoch), so a resumed run only needs
the epoch and the position inside it to continue with the same samples.
"""

from __future__ import annotations

import numpy as np


class MixingOrder:
    """Which (source, row) is sample ``k`` of epoch ``e``."""

    def __init__(self, rows_per_source: list[int], weights: list[float], seed: int):
        if len(rows_per_source) != len(weights):
            raise ValueError("one weight per source")
        self.rows = np.asarray(rows_per_source, dtype=np.int64)
        weights = np.where(self.rows > 0, np.asarray(weights, dtype=np.float64), 0.0)
        if weights.sum() <= 0:
            raise ValueError("no source with rows and a positive weight")
        self.seed = seed
        self.epoch_size = int(self.rows[weights > 0].sum())
        self.counts = _largest_remainder(self.epoch_size, weights / weights.sum())

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row index) of every sample of ``epoch``, in order."""
        sources = np.repeat(np.arange(len(self.counts)), self.counts)
        sources = np.random.default_rng([self.seed, 0, epoch]).permutation(sources)
        rows = np.empty(self.epoch_size, dtype=np.int64)
        for source, count in enumerate(self.counts):
            if count:
                rows[sources == source] = self._stream(source, epoch * count, count)
        return sources, rows

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        """Items ``start .. start+count-1`` of the source's endless reshuffled stream."""
        size = int(self.rows[source])
        positions = np.arange(start, start + count, dtype=np.int64)
        passes = positions // size
        out = np.empty(count, dtype=np.int64)
        for number in np.unique(passes):
            permutation = np.random.default_rng([self.seed, 1, source, int(number)]).permutation(size)
            chosen = passes == number
            out[chosen] = permutation[positions[chosen] % size]
        return out


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts
