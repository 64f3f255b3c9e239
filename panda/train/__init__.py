"""The engine-agnostic training loop, checkpoints and metrics.

``panda.train`` is also the library entry point, ``panda.train(recipe_or_path,
overrides=None)``. Python binds the name ``panda.train`` to this package as soon
as any ``panda.train.*`` module is imported, which would hide the function of the
same name in ``panda/__init__.py``; so the package itself is made callable and
forwards to ``panda.job.train``.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, recipe_or_path: Any, overrides: list[str] | None = None,
                 **kwargs: Any) -> Any:
        from panda.job import train

        return train(recipe_or_path, overrides=overrides, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
