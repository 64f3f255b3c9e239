"""``tp``: the tensor-parallel package -- refused, with the reason and the way forward.

tensor-parallel (BlackSamorez/tensor_parallel) split a model over the GPUs of
one process. Its last release, 2.0.0 (2023), no longer works here:

* it imports ``pkg_resources``, which setuptools 81 stopped shipping, so
  ``import tensor_parallel`` fails on a current environment;
* its PreTrainedModel wrapper passes the KV cache around as the nested
  tuples of transformers 4 (``past_key_values``); transformers 5 keeps the
  cache in ``Cache`` objects, so generation breaks, and its per-model slicing
  configs patch attention attributes (``num_heads``) that transformers 5
  removed.

A thin adapter would have to re-implement its cache handling and slicing,
i.e. become a new tensor-parallel implementation. torch's own DTensor tensor
parallelism does that job and is maintained, so ``torch-tp`` is the supported
path and this backend explains that instead of failing deep inside generate.
"""

from __future__ import annotations

from typing import Any

from panda.errors import PandaError
from panda.plugins.api import InferBackend

MESSAGE = ("backend 'tp' (the tensor-parallel package) is not supported: tensor-parallel 2.0.0 "
           "is unmaintained since 2023, fails to import with setuptools>=81 (pkg_resources) and "
           "its model wrapper breaks on transformers 5 (tuple KV caches, removed attention "
           "attributes)")
HINT = ("use --backend torch-tp (torch's native tensor parallelism; --nproc N for N GPUs), or "
        "--backend hf, which spreads a large model over the GPUs of one process; "
        "see docs/inference.md")


class TensorParallelPackage(InferBackend):
    """The tensor-parallel package (unmaintained): explains why and points to torch-tp."""

    def load(self, model_path: str, adapter: str | None = None) -> None:
        raise PandaError(MESSAGE, hint=HINT)

    def generate(self, prompts: list[Any], **sampling: Any):
        raise PandaError(MESSAGE, hint=HINT)
