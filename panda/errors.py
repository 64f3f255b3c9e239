"""The PandaError family: every failure a user can fix by editing their input.

A PandaError reaches the CLI as one line (``error: ...``) plus an optional
``hint:`` line and exit code 2; anything else is a run-time failure (exit 1).
Library callers catch ``PandaError`` and read ``.message`` / ``.hint``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2


class PandaError(Exception):
    """A mistake in what the user gave us: recipe, data, arguments, environment."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class RecipeError(PandaError):
    """The recipe is invalid; ``where`` is ``file:line`` (or ``--set ...``) when known."""

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None,
                 hint: str | None = None):
        prefix = ""
        if where:
            prefix += f"{where}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, hint)
        self.key = key
        self.where = where


class PluginError(PandaError):
    """A plugin name is unknown, ambiguous, or its package cannot be imported."""


class MissingDependencyError(PandaError):
    """An optional package is not installed; the hint is the pip command."""

    def __init__(self, what: str, package: str, extra: str):
        super().__init__(
            f"{what} needs {package}: pip install 'pandallm[{extra}]'",
        )
        self.package = package
        self.extra = extra


class DataError(PandaError):
    """Bad training or evaluation data; message starts with ``path:line``."""


class UsageError(PandaError):
    """A command-line argument or combination of arguments is wrong."""


def require(module: str, *, what: str, package: str | None = None, extra: str):
    """Import an optional dependency or raise MissingDependencyError naming the extra.

    >>> ds = require("deepspeed", what="backend 'deepspeed'", package="DeepSpeed", extra="deepspeed")
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and not (module == missing or module.startswith(missing + ".")):
            raise  # the package is there but one of *its* imports failed: show that
        raise MissingDependencyError(what, package or module, extra) from exc
