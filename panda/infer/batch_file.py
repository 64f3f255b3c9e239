"""Batch files: IN.jsonl -> OUT.jsonl, one answer per request, resumable.

Input: one JSON object per line::

    {"id": "q1", "prompt": "Why is the sky blue?"}
    {"id": "q2", "system": "Answer in French.", "prompt": "Hello"}
    {"id": "q3", "messages": [{"role": "user", "content": "Hi"}, ...]}

``id`` is optional (the line number is used) and must be unique; blank lines
are skipped. Output: one object per request, written as soon as it is done
(so in the order batches finish, not the input order; join on ``id``)::

    {"id": "q1", "output": "...", "finish_reason": "stop", "prompt_tokens": 12,
     "completion_tokens": 40}

Resuming: a rerun reads OUT.jsonl first and skips every id already answered.
A run killed mid-write leaves a partial last line; it is cut off before
appending, so the file stays one valid object per line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from panda.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Request:
    id: Any
    where: str  # "path:line", for error messages
    prompt: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay distinct."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def read_requests(path: str | Path) -> list[Request]:
    """Every request in ``path``; the first bad line raises DataError("path:line: why")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    requests: list[Request] = []
    seen: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            request = parse_request(line, where, default_id=number)
            key = id_key(request.id)
            if key in seen:
                raise DataError(f"{where}: duplicate id {request.id!r} (first on {seen[key]})")
            seen[key] = where
            requests.append(request)
    return requests


def parse_request(line: str, where: str, default_id: Any) -> Request:
    try:
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt, messages, system = record.get("prompt"), record.get("messages"), record.get("system")
    if (prompt is None) == (messages is None):
        raise DataError(f"{where}: give exactly one of \"prompt\" (text) or \"messages\" "
                        "(a list of {\"role\", \"content\"})")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: \"prompt\" must be a string")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: \"system\" must be a string")
    if messages is not None:
        check_messages(messages, where)
    request_id = record.get("id", default_id)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise DataError(f"{where}: \"id\" must be a string or an integer")
    extra = {k: v for k, v in record.items() if k not in ("id", "prompt", "messages", "system")}
    return Request(request_id, where, prompt, system, messages, extra)


def check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ROLES):
            raise DataError(f"{where}: messages[{index}] must be {{\"role\": one of "
                            f"{'/'.join(ROLES)}, \"content\": text}}")


def answered_ids(path: str | Path) -> set[str]:
    """Ids (as ``id_key``) already in OUT.jsonl; cuts a partial last line off the file."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    lines = data[:complete_end].split(b"\n")[:-1]
    done: set[str] = set()
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
            done.add(id_key(record["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if number == len(lines) and complete_end == len(data):
                complete_end -= len(raw) + 1  # a torn last line that happens to end in "\n"
                break
            raise DataError(f"{path}:{number}: not a panda output line; "
                            "refusing to append to it") from None
    if complete_end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(complete_end)
    return done


class OutputWriter:
    """Appends one JSON line per finished request and flushes it, so a kill loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pending(requests: list[Request], done: set[str]) -> Iterator[Request]:
    return (r for r in requests if id_key(r.id) not in done)
