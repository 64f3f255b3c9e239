"""The plugin registry: names come from entry-point metadata, code on first use.

Every model, dataset, method, optimizer, scheduler, training backend and
inference backend is a plugin registered under an entry-point group
(``panda.models``, ...). panda's own plugins are declared in its pyproject the
same way a third-party package declares its own, so there is one mechanism.

Listing names never imports plugin code; ``get(kind, name)`` imports the one
plugin asked for. A plugin that fails to import breaks only what names it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from panda.errors import MissingDependencyError, PluginError

KINDS: dict[str, str] = {
    "model": "panda.models",
    "dataset": "panda.datasets",
    "method": "panda.methods",
    "optimizer": "panda.optimizers",
    "scheduler": "panda.schedulers",
    "backend": "panda.backends",
    "infer_backend": "panda.infer_backends",
}

IN_PROCESS = "<in-process>"


@dataclass
class Entry:
    """One registered plugin: where it comes from, and its class once loaded."""

    kind: str
    name: str
    target: str  # "module:attr", or IN_PROCESS
    package: str  # distribution that declares it
    version: str = ""
    loaded: Any = field(default=None, repr=False)

    def load(self) -> Any:
        if self.loaded is None:
            module_name, _, attr = self.target.partition(":")
            try:
                obj = importlib.import_module(module_name)
                for part in attr.split(".") if attr else []:
                    obj = getattr(obj, part)
            except MissingDependencyError:
                raise
            except Exception as exc:  # any import-time failure is the plugin's, not ours
                raise PluginError(
                    f"{self.kind} '{self.name}' from package {self.package} failed to import "
                    f"({self.target}): {type(exc).__name__}: {exc}",
                    hint=f"reinstall or fix {self.package}; `panda plugins --check` lists every broken plugin",
                ) from exc
            self.loaded = obj
        return self.loaded


class Registry:
    """Entry points of every kind, read lazily once per process."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] | None = None
        self._conflicts: dict[tuple[str, str], list[Entry]] = {}
        self._local: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    # -- reading ---------------------------------------------------------------------------
    def _scan(self) -> dict[str, dict[str, Entry]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        group_to_kind = {group: kind for kind, group in KINDS.items()}
        for dist in metadata.distributions():
            package = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                kind = group_to_kind.get(ep.group)
                if kind is None:
                    continue
                entry = Entry(kind, ep.name, ep.value, package, dist.version)
                other = entries[kind].get(ep.name)
                if other is None:
                    entries[kind][ep.name] = entry
                    continue
                # Packages seen again (another copy further down sys.path) are skipped:
                # the first copy is the one Python imports, so its entry stays.
                claimants = self._conflicts.setdefault((kind, ep.name), [other])
                if all(c.package != package for c in claimants):
                    claimants.append(entry)
        self._conflicts = {key: found for key, found in self._conflicts.items() if len(found) > 1}
        self._entries = entries
        return entries

    def entries(self, kind: str) -> dict[str, Entry]:
        """Name -> Entry for one kind (in-process registrations win), without importing."""
        self._check_kind(kind)
        merged = dict(self._scan()[kind])
        merged.update(self._local[kind])
        return dict(sorted(merged.items()))

    def names(self, kind: str) -> list[str]:
        return list(self.entries(kind))

    def entry(self, kind: str, name: str) -> Entry:
        entries = self.entries(kind)
        claimants = self.claimants(kind, name)
        if len(claimants) > 1:
            packages = sorted(e.package for e in claimants)
            raise PluginError(
                f"{kind} '{name}' is claimed by {len(packages)} packages: "
                f"{', '.join(packages[:-1])} and {packages[-1]}",
                hint="uninstall all but one of them",
            )
        if name not in entries:
            raise PluginError(unknown_name_message(kind, name, list(entries)))
        return entries[name]

    def claimants(self, kind: str, name: str) -> list[Entry]:
        """Every entry that registers ``name``: one, or several when packages clash."""
        if name in self._local[kind]:
            return [self._local[kind][name]]  # an in-process registration overrides them
        if (kind, name) in self._conflicts:
            return list(self._conflicts[(kind, name)])
        return [self._scan()[kind][name]] if name in self._scan()[kind] else []

    def get(self, kind: str, name: str) -> Any:
        """The plugin class registered as ``name``, imported now if it was not yet."""
        return self.entry(kind, name).load()

    # -- writing (tests, notebooks) -----------------------------------------------------------
    def register(self, kind: str, name: str, obj: Any = None) -> Callable[[Any], Any]:
        """Register ``obj`` in this process only; usable as a decorator."""
        self._check_kind(kind)

        def add(target: Any) -> Any:
            self._local[kind][name] = Entry(kind, name, IN_PROCESS, IN_PROCESS, loaded=target)
            return target

        return add(obj) if obj is not None else add

    def unregister(self, kind: str, name: str) -> None:
        self._local[kind].pop(name, None)

    def check(self) -> list[tuple[Entry, str | None]]:
        """Import every plugin; return (entry, error or None) for each."""
        report: list[tuple[Entry, str | None]] = []
        for kind in KINDS:
            for name in self.entries(kind):
                try:
                    self.get(kind, name)
                    error = None
                except Exception as exc:  # report every failure, do not stop at the first
                    error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                # A clash fails the name for every package that claims it: list each.
                report.extend((entry, error) for entry in self.claimants(kind, name))
        return report

    def reset(self) -> None:
        """Forget the metadata scan (after a pip install in this process)."""
        self._entries = None
        self._conflicts = {}

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise PluginError(unknown_name_message("plugin kind", kind, list(KINDS)))


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    message = f"unknown {kind} '{name}'"
    if close:
        message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        message += "."
    message += f" Installed: {', '.join(known) if known else 'none'}"
    return message


registry = Registry()
entries = registry.entries
names = registry.names
get = registry.get
register = registry.register
unregister = registry.unregister
