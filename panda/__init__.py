"""panda: pre-train, fine-tune, align and serve LLMs from one TOML recipe.

``import panda`` stays light (no torch): heavy parts load when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "train"]


def train(recipe_or_path: Any, overrides: list[str] | None = None, **kwargs: Any) -> Any:
    """Train from a Recipe or a recipe path; see ``panda.job``."""
    from panda.job import train as _train

    return _train(recipe_or_path, overrides=overrides, **kwargs)
