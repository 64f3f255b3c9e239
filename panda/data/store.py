"""The tokenized documents of one source, as a memory-mapped Arrow file.

Arrow is what Hugging Face ``datasets`` keeps its caches in; the file is in
its streaming format, so ``datasets.Dataset.from_file(path)`` opens it as is
for a look around. We read it with pyarrow directly: a memory map costs no
load time (a cache hit is milliseconds however large the data) and pages come
from the OS page cache, shared by every rank on the node.

Columns: ``input_ids`` (list<int32>) and ``loss_mask`` (list<uint8>, 1 =
carries loss) for ``lm`` data; ``chosen_input_ids``, ``chosen_loss_mask``,
``rejected_input_ids``, ``rejected_loss_mask`` for ``pair`` data (prompt
included in both). ``file`` and ``line`` locate the record each document
came from (``panda data inspect`` shows them; the eval split uses them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

SIDES = {"lm": ("",), "pair": ("chosen_", "rejected_")}
ROWS_PER_BATCH = 8192


def schema(data_format: str) -> pa.Schema:
    fields = []
    for side in SIDES[data_format]:
        fields += [pa.field(f"{side}input_ids", pa.list_(pa.int32())),
                   pa.field(f"{side}loss_mask", pa.list_(pa.uint8()))]
    return pa.schema(fields + [pa.field("file", pa.int32()), pa.field("line", pa.int32())])


class StoreWriter:
    """Appends documents and writes them out in record batches."""

    def __init__(self, path: str, data_format: str):
        self.data_format = data_format
        self.schema = schema(data_format)
        self._sink = pa.OSFile(path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._columns: dict[str, list] = {name: [] for name in self.schema.names}
        self.documents = 0

    def add(self, example: Any, file: int, line: int) -> None:
        """One document: ``(ids, mask)``, or for pairs ``{"chosen": (ids, mask), "rejected": ...}``."""
        if self.data_format == "pair":
            for side in ("chosen", "rejected"):
                ids, mask = example[side]
                self._columns[f"{side}_input_ids"].append(ids)
                self._columns[f"{side}_loss_mask"].append(mask)
        else:
            ids, mask = example
            self._columns["input_ids"].append(ids)
            self._columns["loss_mask"].append(mask)
        self._columns["file"].append(file)
        self._columns["line"].append(line)
        self.documents += 1
        if len(self._columns["file"]) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._columns["file"]:
            return
        arrays = [pa.array(self._columns[f.name], type=f.type) for f in self.schema]
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self._columns = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


class ListColumn:
    """Zero-copy access to row ``i`` of a list column split over record batches."""

    def __init__(self, chunked: pa.ChunkedArray):
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        firsts = [0]
        for chunk in chunked.chunks:
            offsets = chunk.offsets.to_numpy()
            self._offsets.append(offsets - offsets[0])
            self._values.append(chunk.values.to_numpy(zero_copy_only=True)[offsets[0]:offsets[-1]])
            firsts.append(firsts[-1] + len(chunk))
        self._firsts = np.asarray(firsts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._firsts[-1])

    def lengths(self) -> np.ndarray:
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64)

    def __getitem__(self, index: int) -> np.ndarray:
        chunk = int(np.searchsorted(self._firsts, index, side="right")) - 1
        local = index - int(self._firsts[chunk])
        offsets = self._offsets[chunk]
        return self._values[chunk][offsets[local]:offsets[local + 1]]


class TokenStore:
    """The documents of one source, memory-mapped read-only."""

    def __init__(self, path: str):
        self.path = path
        self._mapped = pa.memory_map(path, "r")  # stays open: the columns point into it
        table = pa.ipc.open_stream(self._mapped).read_all()
        self.data_format = "pair" if "chosen_input_ids" in table.column_names else "lm"
        self.columns = {name: ListColumn(table.column(name))
                        for name in table.column_names if name not in ("file", "line")}
        self.file = table.column("file").to_numpy()
        self.line = table.column("line").to_numpy()

    def __len__(self) -> int:
        return len(self.file)

    def lengths(self) -> np.ndarray:
        """Tokens of each document (for a pair: of its longer side)."""
        if self.data_format == "pair":
            return np.maximum(self.columns["chosen_input_ids"].lengths(),
                              self.columns["rejected_input_ids"].lengths())
        return self.columns["input_ids"].lengths()

    def document(self, index: int, side: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of one document; ``side`` is "chosen_"/"rejected_" for pairs."""
        return self.columns[f"{side}input_ids"][index], self.columns[f"{side}loss_mask"][index]
