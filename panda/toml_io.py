"""TOML helpers the standard library lacks: where each key is written, and writing.

``tomllib`` parses but forgets positions; recipe errors must say ``file:line``,
so ``key_lines`` scans the text once for table headers and ``key =`` lines.
``dumps`` writes a recipe back (with optional per-key comments for
``panda recipe show --origin``, which is why we do not use tomli-w).
"""

from __future__ import annotations

import json
import re
from typing import Any

Path = tuple  # a key path: ("data", "sources", 0, "path")

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str) -> list[str] | None:
    """Split a TOML dotted key ``a."b.c".d`` into parts; None if it is not a key."""
    parts, i, text = [], 0, text.strip()
    while i < len(text):
        if text[i] in "\"'":
            end = text.find(text[i], i + 1)
            if end < 0:
                return None
            parts.append(text[i + 1:end])
            i = end + 1
        else:
            match = _BARE.match(text, i)
            if not match:
                return None
            parts.append(match.group())
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text):
            if text[i] != ".":
                return None
            i += 1
            while i < len(text) and text[i] in " \t":
                i += 1
    return parts or None


def _scan_value_state(line: str, depth: int, in_multiline: str | None) -> tuple[int, str | None]:
    """Track open brackets and multi-line strings across lines (skipping string contents)."""
    i = 0
    while i < len(line):
        if in_multiline:
            end = line.find(in_multiline, i)
            if end < 0:
                return depth, in_multiline
            i, in_multiline = end + 3, None
            continue
        ch = line[i]
        if ch == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            in_multiline, i = line[i:i + 3], i + 3
            continue
        if ch in "\"'":
            end = i + 1
            while end < len(line) and line[end] != ch:
                end += 2 if (ch == '"' and line[end] == "\\") else 1
            i = end + 1
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        i += 1
    return depth, in_multiline


def key_lines(text: str) -> dict[Path, int]:
    """Map each key path written in ``text`` (tables included) to its 1-based line."""
    lines: dict[Path, int] = {}
    table: tuple = ()
    array_counts: dict[tuple, int] = {}
    depth, multiline = 0, None
    for number, raw in enumerate(text.splitlines(), 1):
        if depth > 0 or multiline:
            depth, multiline = _scan_value_state(raw, depth, multiline)
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            parts = _split_key(line[2:line.find("]]")]) if "]]" in line else None
            if parts:
                index = array_counts.get(tuple(parts), 0)
                array_counts[tuple(parts)] = index + 1
                table = (*parts, index)
                lines.setdefault(tuple(parts), number)
                lines[table] = number
            continue
        if line.startswith("["):
            parts = _split_key(line[1:line.find("]")]) if "]" in line else None
            if parts:
                table = _resolve_array_prefix(tuple(parts), array_counts)
                lines[table] = number
            continue
        key_text, eq, value = line.partition("=")
        parts = _split_key(key_text) if eq else None
        if parts:
            lines[(*table, *parts)] = number
            depth, multiline = _scan_value_state(value, 0, None)
    return lines


def _resolve_array_prefix(parts: tuple, array_counts: dict[tuple, int]) -> tuple:
    """[data.sources.extra] after [[data.sources]] refers to the last array element."""
    for cut in range(len(parts), 0, -1):
        count = array_counts.get(parts[:cut])
        if count:
            return (*parts[:cut], count - 1, *parts[cut:])
    return parts


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- writing --------------------------------------------------------------------------------

def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    return key if _BARE.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dumps(data: dict[str, Any], comments: dict[Path, str] | None = None) -> str:
    """Write ``data`` as TOML; ``None`` values are left out (TOML has no null)."""
    comments = comments or {}
    out: list[str] = []

    def emit_table(table: dict[str, Any], path: tuple, header: str | None) -> None:
        scalars = [(k, v) for k, v in table.items()
                   if v is not None and not isinstance(v, dict) and not _is_table_array(v)]
        # A table holding only sub-tables needs no header of its own, but an empty
        # one does: `[lora]` with every key at its default still means "LoRA on".
        empty = all(v is None for v in table.values())
        if header is not None and (scalars or empty):
            out.append(header)
        for key, value in scalars:
            note = comments.get((*path, key))
            out.append(f"{_key(key)} = {_value(value)}" + (f"  # {note}" if note else ""))
        for key, value in table.items():
            dotted = ".".join(_key(str(p)) for p in (*[p for p in path if not isinstance(p, int)], key))
            if isinstance(value, dict):
                if out and out[-1] != "":
                    out.append("")
                emit_table(value, (*path, key), f"[{dotted}]")
            elif _is_table_array(value):
                for index, item in enumerate(value):
                    if out and out[-1] != "":
                        out.append("")
                    emit_table(item, (*path, key, index), f"[[{dotted}]]")

    emit_table(data, (), None)
    return "\n".join(out).strip() + "\n"
