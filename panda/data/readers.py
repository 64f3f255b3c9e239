"""Record readers: which files a source names, and the records in each, with line numbers.

A source ``path`` is a file, a directory (searched recursively for the format's
extensions), a glob, or a list of them. Files are read in sorted order so a
source always yields its records in the same order.

Readers never stop at a bad line themselves: they yield ``(where, BadRecord)``
so the pipeline decides (stop with ``path:line: ...``, or skip and count).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from panda.errors import DataError
from panda.plugins.api import BadRecord

Located = tuple[str, Any]  # ("path:line", record dict or BadRecord)


def resolve_files(path: str | list[str] | None, *, default: str | None,
                  extensions: Iterable[str], where: str) -> list[str]:
    """The files a source names, sorted and without duplicates.

    ``where`` names the recipe key in errors (``data.sources[0].path``).
    """
    specs = [path] if isinstance(path, str) else list(path or [])
    if not specs:
        if default is None:
            raise DataError(f"{where}: no path given and this format has no default path")
        specs = [default]
    extensions = tuple(extensions)
    files: list[str] = []
    for spec in specs:
        files.extend(_files_of(spec, extensions, where))
    unique = sorted(dict.fromkeys(files))
    if not unique:
        raise DataError(f"{where}: no data files ({', '.join('*' + e for e in extensions)}) "
                        f"in {', '.join(specs)}")
    return unique


def _files_of(spec: str, extensions: tuple[str, ...], where: str) -> list[str]:
    if any(ch in spec for ch in "*?["):
        matches = [m for m in glob.glob(spec, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise DataError(f"{where}: no file matches {spec}")
        return matches
    if os.path.isdir(spec):
        return [str(p) for p in Path(spec).rglob("*")
                if p.is_file() and p.name.endswith(extensions) and not p.name.startswith(".")]
    if os.path.isfile(spec):
        return [spec]
    raise DataError(f"{where}: {spec} does not exist",
                    hint="paths are relative to the directory you run panda from")


def read_json_records(path: str) -> Iterator[Located]:
    """Records of a ``.jsonl`` file, or of a ``.json`` file (an array, or JSON lines).

    JSON lines are streamed (pre-training corpora can be far larger than
    memory); an array is read whole. An empty file yields one BadRecord: a
    source file without records is almost always a mistake (a failed export).
    """
    first = _first_character(path)
    if not first:
        yield f"{path}:1", BadRecord("empty file: no records")
        return
    if first == b"[":
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            yield f"{path}:1", BadRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        yield from _json_array(path, text)
    else:
        yield from _json_lines(path)


def _first_character(path: str) -> bytes:
    """The first byte that is neither white space nor a UTF-8 byte-order mark; b"" if none."""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            rest = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if rest:
                return rest[:1]
    return b""


def _json_lines(path: str) -> Iterator[Located]:
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield where, BadRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRecord(f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            yield where, _object_or_bad(record)


def _json_array(path: str, text: str) -> Iterator[Located]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line, counted_to = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, position)
        counted_to = position
        return line

    def skip_space(position: int) -> int:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        return position

    index = skip_space(index)
    if index < len(text) and text[index] == "]":
        yield f"{path}:{line_at(index)}", BadRecord("empty JSON array: no records")
        return
    while True:
        index = skip_space(index)
        where = f"{path}:{line_at(index)}"
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            # Inside an array there is no next line to resume from: stop here.
            yield f"{path}:{exc.lineno}", BadRecord(f"invalid JSON: {exc.msg} (column "
                                                    f"{exc.colno}); cannot read the rest of "
                                                    "the array")
            return
        yield where, _object_or_bad(record)
        index = skip_space(index)
        if index < len(text) and text[index] == ",":
            index += 1
            continue
        if index < len(text) and text[index] == "]":
            if text[index + 1:].strip():
                yield f"{path}:{line_at(index)}", BadRecord("extra data after the JSON array")
            return
        yield f"{path}:{line_at(min(index, len(text)))}", BadRecord(
            "invalid JSON: expected ',' or ']' between array elements")
        return


def _object_or_bad(record: Any) -> Any:
    if isinstance(record, dict):
        return record
    kind = {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(record), type(record).__name__)
    return BadRecord(f"expected a JSON object, got {kind}")


def read_text_documents(path: str, *, per: str) -> Iterator[Located]:
    """Plain-text documents: the whole file (``per="file"``) or each blank-line block."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        yield f"{path}:1", BadRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
        return
    if not text.strip():
        yield f"{path}:1", BadRecord("empty file: no text")
        return
    if per == "file":
        yield f"{path}:1", {"text": text}
        return
    block: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield f"{path}:{start}", {"text": "\n".join(block)}
            block = []
    if block:
        yield f"{path}:{start}", {"text": "\n".join(block)}
