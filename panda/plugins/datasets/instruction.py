"""PandaLLM instruction data: ``{"input": ..., "target": ...}``, input masked out of the loss."""

from __future__ import annotations

from panda.plugins.api import DatasetPlugin


class Instruction(DatasetPlugin):
    """PandaLLM instruction records {"input", "target"}; only the target is trained."""

    default_path = "dataset/instruction_tuning"
