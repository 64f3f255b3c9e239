"""Load a TOML recipe into a validated Recipe, with errors that point at file:line.

Steps: read the file (and the chain of ``extends`` parents, merged parent
first), apply ``--set key=value`` overrides, then validate section by section:
plugin sections are split into the keys shared by their kind and the keys the
named plugin's ``Options`` model validates. The first problem found is raised
as one RecipeError naming the dotted key, where it was written, and what is
allowed. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path as FsPath
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ValidationError

from panda import registry
from panda.errors import PandaError, RecipeError
from panda.recipe_schema import (PLUGIN_SECTIONS, DataSection, InvalidKey, PluginSection,
                                 Recipe, SourceSection)
from panda.toml_io import _split_key, dumps, format_path, key_lines

Origins = dict[tuple, str]  # key path -> "file:line" or "--set k=v"


# -- reading files and overrides -----------------------------------------------------------

def read_recipe(path: str | FsPath, _chain: tuple[FsPath, ...] = ()) -> tuple[dict, Origins]:
    """Raw data of a recipe file with its ``extends`` parents merged, and key origins."""
    file = FsPath(path)
    shown = str(path)
    resolved = file.resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if _chain:
            raise
        raise RecipeError(f"recipe file not found: {shown}",
                          hint="check the path, or create one with `panda recipe init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {shown}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_syntax_error(exc, text, shown) from None
    origins = _file_origins(text, data, shown)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise RecipeError("must be a path string", key="extends", where=origins.get(("extends",)))
    parent_file = (file.parent / parent)
    chain = (*_chain, resolved)
    if parent_file.resolve() in chain:
        # Reported at the extends line that closes the loop, in the file that has it.
        cycle = " -> ".join(p.name for p in (*chain, parent_file.resolve()))
        raise RecipeError(f"extends cycle: {cycle}", key="extends",
                          where=origins.get(("extends",), shown),
                          hint="remove one of the extends lines")
    try:
        parent_data, parent_origins = read_recipe(parent_file, chain)
    except FileNotFoundError:
        raise RecipeError(f"extended recipe not found: {parent_file}", key="extends",
                          where=origins.get(("extends",), shown),
                          hint="paths in extends are relative to the recipe that names them"
                          ) from None
    return merge(parent_data, parent_origins, data, origins)


def _file_origins(text: str, data: dict, shown: str) -> Origins:
    """``file:line`` of every key written in ``text``, keys inside inline tables included."""
    origins: Origins = {}
    lines = text.splitlines()
    for path, line in key_lines(text).items():
        origins[path] = f"{shown}:{line}"
        if not lines[line - 1].lstrip().startswith("["):  # `key = {...}`, not a [table]
            _spread_origin(origins, path, _get(data, path), f"{shown}:{line}")
    return origins


def _spread_origin(origins: Origins, path: tuple, value: Any, origin: str) -> None:
    """Give every key nested in an inline value the origin of the line that holds it."""
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        origins.setdefault((*path, key), origin)
        _spread_origin(origins, (*path, key), item, origin)


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _toml_syntax_error(exc: tomllib.TOMLDecodeError, text: str, shown: str) -> RecipeError:
    """A located error for a file tomllib rejects, naming the key on that line if any."""
    message = str(exc)
    line = getattr(exc, "lineno", None) or _line_from_message(message)
    if line is None and "end of document" in message:
        line = max(1, len(text.splitlines()))  # e.g. an array never closed
    message = re.sub(r" \(at (line \d+, column \d+|end of document)\)$", "", message)
    keys_here = [path for path, at in key_lines(text).items() if at == line]
    key = format_path(max(keys_here, key=len)) if keys_here else None
    return RecipeError(f"invalid TOML: {message}", key=key,
                       where=f"{shown}:{line}" if line else shown,
                       hint="see https://toml.io for the syntax")


def _line_from_message(message: str) -> int | None:
    match = re.search(r"at line (\d+)", message)
    return int(match.group(1)) if match else None


def merge(base: dict, base_origins: Origins, top: dict, top_origins: Origins
          ) -> tuple[dict, Origins]:
    """Deep-merge ``top`` over ``base``: tables merge key by key, anything else replaces."""
    origins = dict(base_origins)

    def walk(into: dict, over: dict, prefix: tuple) -> None:
        for key, value in over.items():
            path = (*prefix, key)
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                walk(into[key], value, path)
                continue
            for old in [p for p in origins if p[:len(path)] == path]:
                del origins[old]  # the replaced value's positions no longer apply
            into[key] = value

    merged = _copy(base)
    walk(merged, top, ())
    origins.update(top_origins)
    return merged, origins


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def parse_override(text: str) -> tuple[tuple, Any]:
    """``"optim.lr=2e-5"`` -> (("optim", "lr"), 2e-05); the value is read as TOML.

    A bare word that is not valid TOML (``run.name=my-run``) is taken as a string.
    """
    key_text, eq, raw = text.partition("=")
    key_text = re.sub(r"\[(\d+)\]", r".\1", key_text.strip())
    parts = _split_key(key_text) if eq else None
    if not parts:
        raise RecipeError(f"bad --set '{text}': expected KEY=VALUE with a dotted key",
                          hint="for example --set optim.lr=2e-5 or --set data.sources[0].path=x.jsonl")
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not raw or raw[0] in "[{\"'" or "\n" in raw:
            raise RecipeError("the value is not valid TOML", key=format_path(path),
                              where=f"--set {text}",
                              hint="quote strings, e.g. --set 'run.name=\"a b\"'") from None
        value = raw
    return path, value


def apply_override(data: dict, origins: Origins, text: str) -> None:
    path, value = parse_override(text)
    target: Any = data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(part, int):
            _check_index(target, path[:depth + 1], text)
            target = target[part]
            continue
        if not isinstance(target, dict):
            raise RecipeError("is not a table", key=format_path(path[:depth]), where=f"--set {text}")
        target = target.setdefault(part, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(last, int):
        _check_index(target, path, text)
    elif not isinstance(target, dict):
        raise RecipeError("is not a table", key=format_path(path[:-1]), where=f"--set {text}")
    target[last] = value
    for old in [p for p in origins if p[:len(path)] == path]:
        del origins[old]
    origins[path] = f"--set {text}"
    _spread_origin(origins, path, value, f"--set {text}")


def _check_index(target: Any, path: tuple, text: str) -> None:
    """``--set`` may change an existing array element but not invent one."""
    if not isinstance(target, list):
        raise RecipeError("is not an array", key=format_path(path[:-1]), where=f"--set {text}")
    if path[-1] >= len(target):
        raise RecipeError(f"index {path[-1]} is out of range: {format_path(path[:-1])} has "
                          f"{len(target)} element(s)", key=format_path(path),
                          where=f"--set {text}")


# -- validation -----------------------------------------------------------------------------

def load(path: str | FsPath, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    return load_with_origins(path, overrides)[0]


def load_with_origins(path: str | FsPath, overrides: Iterable[str] = ()) -> tuple[Recipe, Origins]:
    data, origins = read_recipe(path)
    for text in overrides:
        apply_override(data, origins, text)
    return validate(data, origins, default_where=str(path)), origins


def validate(data: dict, origins: Origins | None = None, default_where: str | None = None
             ) -> Recipe:
    """Validate raw recipe data; raise the first problem as a located RecipeError."""
    locate = _Locator(origins or {}, default_where)
    allowed = list(Recipe.model_fields)
    for key in data:
        if key not in Recipe.model_fields:
            raise locate.error((key,), _unknown_key(key, allowed, "top-level section"))
    sections: dict[str, Any] = {}
    for key, section_type in PLUGIN_SECTIONS.items():  # absent = defaults, still validated
        sections[key] = _plugin_section(section_type, data.get(key, {}), (key,), locate)
    for key, value in data.items():
        if key == "data":
            sections[key] = _data_section(value, locate)
        elif key not in sections:
            sections[key] = _core_section(key, value, locate)
    try:
        recipe = Recipe.model_validate(sections)
    except ValidationError as exc:
        raise locate.from_validation(exc, ()) from None
    for path, message in _cross_section_problems(recipe):
        raise locate.error(path, message)
    return recipe


def _plugin_section(section_type: type[PluginSection], raw: Any, path: tuple,
                    locate: "_Locator") -> PluginSection:
    if not isinstance(raw, dict):
        raise locate.error(path, f"must be a table, got {_type_name(raw)}")
    shared = {k: v for k, v in raw.items() if k in section_type.model_fields}
    own = {k: v for k, v in raw.items() if k not in section_type.model_fields}
    try:
        section = section_type.model_validate(shared)
    except ValidationError as exc:
        raise locate.from_validation(exc, path) from None
    if section_type.kind == "backend" and section.name == "auto":
        if own:
            raise locate.error((*path, next(iter(own))), "backend options need a backend: set "
                               "backend.name (single, ddp, fsdp, deepspeed, ...)")
        return section
    try:
        plugin = registry.get(section_type.kind, section.name)
    except PandaError as exc:
        raise locate.error((*path, "name"), exc.message, hint=exc.hint) from None
    options_type: type[BaseModel] = plugin.Options
    try:
        options = options_type.model_validate(own)
    except ValidationError as exc:
        allowed = [*[f for f in section_type.model_fields if f != "options"],
                   *options_type.model_fields]
        raise locate.from_validation(exc, path, allowed=allowed,
                                     owner=f"{section_type.kind} '{section.name}'") from None
    return section.model_copy(update={"options": options})


def _core_section(key: str, raw: Any, locate: "_Locator") -> Any:
    """Validate a section without plugins against its own model (so errors name it)."""
    section_type = Recipe.model_fields[key].annotation
    section_type = next((t for t in getattr(section_type, "__args__", ()) if t is not type(None)),
                        section_type)
    if not isinstance(raw, dict):
        raise locate.error((key,), f"must be a table, got {_type_name(raw)}")
    try:
        return section_type.model_validate(raw)
    except ValidationError as exc:
        raise locate.from_validation(exc, (key,)) from None


def _data_section(raw: Any, locate: "_Locator") -> DataSection:
    if not isinstance(raw, dict):
        raise locate.error(("data",), f"must be a table, got {_type_name(raw)}")
    raw = dict(raw)
    for key in ("sources", "eval_sources"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, list):
                raise locate.error(("data", key), "must be an array of tables ([[data."
                                   f"{key}]]), got {_type_name(value)}")
            raw[key] = [_plugin_section(SourceSection, item, ("data", key, i), locate)
                        for i, item in enumerate(value)]
    try:
        return DataSection.model_validate(raw)
    except ValidationError as exc:
        raise locate.from_validation(exc, ("data",)) from None


def _cross_section_problems(recipe: Recipe) -> Iterator[tuple[tuple, str]]:
    """Settings that are each valid but contradict one another."""
    if recipe.quant is not None and recipe.lora is None:
        yield ("quant",), "a quantized base cannot be trained in full: add a [lora] section (QLoRA)"
    if recipe.lora is not None or recipe.quant is not None:
        from panda.adapters import lora_recipe_problems  # imports no torch

        yield from lora_recipe_problems(recipe)
    has_eval = recipe.data.eval_sources or recipe.data.eval_fraction > 0
    if recipe.train.eval_every > 0 and not has_eval:
        yield ("train", "eval_every"), ("evaluation needs data: add [[data.eval_sources]] or "
                                        "set data.eval_fraction")
    for path, section in recipe.plugin_sections():
        if section.options is None:
            continue
        plugin = registry.get(section.kind, section.name)
        try:
            plugin.check_recipe(section.options, recipe)
        except InvalidKey as exc:  # names the offending key, from the recipe's root
            yield exc.key, str(exc)
        except ValueError as exc:
            yield path, str(exc)


# -- error locations ------------------------------------------------------------------------

class _Locator:
    """Turns key paths into located RecipeErrors."""

    def __init__(self, origins: Origins, default_where: str | None):
        self.origins = origins
        self.default_where = default_where

    def where(self, path: tuple) -> str | None:
        for cut in range(len(path), 0, -1):
            if path[:cut] in self.origins:
                return self.origins[path[:cut]]
        return self.default_where

    def error(self, path: tuple, message: str, hint: str | None = None) -> RecipeError:
        return RecipeError(message, key=format_path(path), where=self.where(path), hint=hint)

    def from_validation(self, exc: ValidationError, prefix: tuple, *,
                        allowed: list[str] | None = None, owner: str = "") -> RecipeError:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, InvalidKey):  # a model validator that knows which key is wrong
            loc = (*loc, *cause.key)
        path = (*prefix, *loc)
        kind = first["type"]
        if kind == "extra_forbidden":
            names = allowed or _allowed_at(exc.title)
            owner = owner or (f"[{format_path(path[:-1])}]" if len(path) > 1 else "the recipe")
            return self.error(path, _unknown_key(str(loc[-1]), names, owner))
        if kind == "missing" and isinstance(path[-1], int):  # a fixed-length array, too short
            return self.error(path[:-1], "has too few items")
        if kind == "missing":
            return self.error(path, "required key is missing")
        message = first["msg"].removeprefix("Value error, ")
        if kind not in ("value_error", "assertion_error") and "input" in first:
            message += f" (got {_show(first['input'])})"
        return self.error(path, message)


def _allowed_at(model_title: str) -> list[str]:
    from panda import recipe_schema

    model = getattr(recipe_schema, model_title, None)
    fields = getattr(model, "model_fields", {})
    return [name for name in fields if name != "options"]


def _unknown_key(key: str, allowed: list[str], owner: str) -> str:
    close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.6)
    message = f"unknown key '{key}'"
    if owner:
        message += f" for {owner}"
    message += f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return message + f" Allowed: {', '.join(allowed)}"


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- writing --------------------------------------------------------------------------------

def to_toml(recipe: Recipe, origins: Origins | None = None) -> str:
    """The fully resolved recipe as TOML; with ``origins``, each key says where it came from."""
    comments = None
    if origins is not None:
        comments = {}
        for path, _ in _leaf_paths(recipe.dump()):
            comments[path] = origins.get(path, "default")
    return dumps(recipe.dump(), comments)


def _leaf_paths(data: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for index, value in enumerate(data):
            yield from _leaf_paths(value, (*prefix, index))
    else:
        yield prefix, data
