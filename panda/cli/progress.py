"""Progress of long tensor-by-tensor work (merge-lora, make-delta, apply-delta).

A rich progress bar when stderr is a terminal; otherwise a plain line at every
tenth of the work, so logs and CI stay readable.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator


@contextlib.contextmanager
def tensor_progress(what: str) -> Iterator[Callable[[int, int, str], None]]:
    """Yield ``report(done, total, name)`` for a library function's ``progress``."""
    stream = sys.stderr
    if stream.isatty():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[name]}"), console=Console(file=stream),
                       transient=True)
        task = bar.add_task(what, total=None, name="")
        with bar:
            yield lambda done, total, name: bar.update(task, completed=done, total=total,
                                                       name=name)
        return
    started = time.perf_counter()
    shown = {"tenth": -1}

    def report(done: int, total: int, name: str) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > shown["tenth"]:
            shown["tenth"] = tenth
            print(f"{what}: {done}/{total} tensors, {time.perf_counter() - started:.0f} s",
                  file=stream, flush=True)

    yield report
