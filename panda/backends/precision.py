"""Numeric precision of training: fp32, bf16 or fp16 autocast over fp32 master weights.

bf16/fp16 run the forward pass under ``torch.autocast`` while every trainable
parameter stays in fp32, so optimizer updates are not lost to rounding (a
bf16 weight cannot absorb an update smaller than 1/256 of itself). fp16 also
needs a GradScaler: its narrow exponent range underflows small gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One of ``fp32``, ``bf16``, ``fp16`` on one device type (``cpu`` or ``cuda``)."""

    def __init__(self, name: str, device_type: str):
        if name not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"unknown precision {name!r}")
        self.name = name
        self.device_type = device_type

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Cast in place: trainable weights to fp32; under fp32, everything floating."""
        if self.name == "fp32" and not getattr(model, "is_quantized", False):
            model.float()
            return
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()

    def autocast(self) -> Any:
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPES[self.name])

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None
