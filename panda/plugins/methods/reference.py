"""DPO's reference model: where the reference log-probs of each pair come from.

Three ways, chosen by :func:`choose_reference` when the method prepares the model:

* :class:`FrozenCopy`: a frozen copy of the starting weights, made before the
  backend touches the model (full fine-tuning). It is not wrapped by the
  backend: every data-parallel rank holds a whole copy, in the dtype the model
  was loaded in, moved to the batch's device at first use.
* :class:`StartingPolicy`: the policy itself with its LoRA adapter switched off
  (``PeftModel.disable_adapter()``). LoRA starts with B = 0, so the base *is*
  the starting policy, and no second copy of the weights exists.
* :class:`Precomputed`: ``precompute_ref = true``. Before training, one pass
  over the data computes every pair's reference log-probs with the starting
  policy (through the backend's ``eval_step``, so sharded backends run it as
  they run evaluation); they are cached next to the token cache under
  ``$PANDA_CACHE/ref_logps/<key>`` (key: the token stores and split rows, the
  model's identity, precision and attention) and attached to each batch as
  ``_ref_chosen_logps`` / ``_ref_rejected_logps``. No reference model is kept.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from panda.errors import PandaError
from panda.plugins.methods.preference import (PairLogps, labelled_row_logps, split_pairs,
                                              stacked_pairs)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
REF_LOGPS_VERSION = 1
REF_KEYS = ("_ref_chosen_logps", "_ref_rejected_logps")


def bare_module(model: Any) -> Any:
    """The module inside DDP / DeepSpeed wrappers (they keep it as ``.module``)."""
    import torch

    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def peft_model_of(model: Any) -> Any:
    """The peft model inside any wrapper, or None when the model carries no adapter."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a stripped install should still run full FT
        return None
    bare = bare_module(model)
    return bare if isinstance(bare, PeftModel) else None


class FrozenCopy:
    """A frozen copy of the starting weights (full fine-tuning without precompute_ref)."""

    def __init__(self, model: "torch.nn.Module"):
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise PandaError("a frozen full copy of the weights cannot be made from a model "
                             "that DeepSpeed ZeRO-3 built partitioned",
                             hint="set backend.zero_init = false, or use [lora] or "
                             "method.precompute_ref = true")
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def pair_logps(self, policy: Any, batch: dict[str, Any]) -> PairLogps:
        import torch

        input_ids, labels = stacked_pairs(batch)
        if next(self.model.parameters()).device != input_ids.device:
            self.model.to(input_ids.device)
        with torch.no_grad():
            return split_pairs(*labelled_row_logps(self.model, input_ids, labels))


class StartingPolicy:
    """The policy with its LoRA adapter disabled (or, for precompute, the starting policy)."""

    def __init__(self, require_adapter: bool):
        self.require_adapter = require_adapter

    def pair_logps(self, policy: Any, batch: dict[str, Any]) -> PairLogps:
        import torch

        peft = peft_model_of(policy)
        if peft is None and self.require_adapter:
            raise PandaError("dpo expected a LoRA (peft) model for its reference, got "
                             f"{type(bare_module(policy)).__name__}",
                             hint="report this: [lora] is set but the model has no adapter")
        module = peft if peft is not None else bare_module(policy)
        input_ids, labels = stacked_pairs(batch)
        was_training = module.training
        module.eval()  # the reference has no dropout, like a frozen copy
        try:
            with torch.no_grad():
                if peft is None:
                    return split_pairs(*labelled_row_logps(module, input_ids, labels))
                with peft.disable_adapter():
                    return split_pairs(*labelled_row_logps(module, input_ids, labels))
        finally:
            module.train(was_training)


class Precomputed:
    """Reference log-probs attached to each batch by :class:`WithReferenceLogps`."""

    def pair_logps(self, policy: Any, batch: dict[str, Any]) -> PairLogps:
        import torch

        device = batch["chosen_input_ids"].device
        if REF_KEYS[0] not in batch:
            raise PandaError("dpo with precompute_ref = true got a batch without reference "
                             "log-probs", hint="report this: the precompute pass did not run")
        chosen, rejected = (batch[key].to(device=device, dtype=torch.float32) for key in REF_KEYS)
        _, labels = stacked_pairs(batch)
        counts = (labels[:, 1:] != -100).sum(dim=1)
        pairs = chosen.shape[0]
        return PairLogps(chosen, rejected, counts[:pairs], counts[pairs:])


def choose_reference(model: Any, recipe: Any, precompute: bool) -> Any:
    """The reference for this run (see the module docstring)."""
    if precompute:
        return Precomputed()
    if recipe is not None and getattr(recipe, "lora", None) is not None \
            or peft_model_of(model) is not None:
        return StartingPolicy(require_adapter=True)
    return FrozenCopy(model)


# -- precompute_ref ---------------------------------------------------------------------------

def model_identity(recipe: Any) -> list[Any]:
    """What decides the starting weights and how they compute: the [model] options, the files
    of model.path (path, size, mtime), the seed of a preset, [quant], precision."""
    from panda.data.cache import file_fingerprint

    options = recipe.model.options
    parts: list[Any] = [recipe.model.name, options.model_dump(mode="json") if options else None,
                        recipe.train.precision,
                        recipe.quant.model_dump(mode="json") if recipe.quant else None]
    path = getattr(options, "path", None)
    if path and Path(path).is_dir():
        parts.append([file_fingerprint(str(f)) for f in sorted(Path(path).iterdir())
                      if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".pt")])
    else:
        parts.append(recipe.run.seed)  # a preset is initialised from the run's seed
    return parts


def _split_key(prepared: Any, recipe: Any) -> str:
    import hashlib

    from panda.data import cache

    sources = []
    for source in prepared.sources:
        rows = hashlib.sha256(source.plan.docs.tobytes() + source.plan.starts.tobytes())
        sources.append([os.path.basename(os.path.dirname(source.store.path)) or source.store.path,
                        rows.hexdigest()[:20]])
    return cache.fingerprint("ref-logps", REF_LOGPS_VERSION, prepared.split, sources,
                             model_identity(recipe))


def precompute_reference_logps(job: Any, batches: Any, collect: Any) -> list[Any]:
    """Per source of ``batches.prepared``, a (2, rows) float64 array: the reference log-probs
    of each pair's chosen and rejected reply, from the cache or computed now.

    Every rank takes part (sharded backends need each rank in every forward):
    rank r scores its slice of the pairs, then a sum over ranks gives everyone
    all of them. ``collect(batch) -> (chosen, rejected)`` returns a batch's
    reference log-probs, run inside ``backend.eval_step`` by the method.
    """
    import numpy as np

    from panda.data import EvalBatches, cache

    prepared = batches.prepared
    folder = cache.cache_root() / "ref_logps" / _split_key(prepared, job.recipe)
    file = folder / "logps.npz"
    everyone_has_it = job.backend.all_reduce_sum([float(file.is_file())])[0]
    if everyone_has_it == job.dist.world_size:
        with np.load(file) as saved:
            return [saved[f"source{i}"] for i in range(len(prepared.sources))]
    rank, ranks = _data_shard(job)
    tables = [np.zeros((2, s.plan.num_rows), dtype=np.float64) for s in prepared.sources]
    passes = EvalBatches(prepared, batch_size=job.recipe.train.per_device_batch_size,
                         rank=rank, world_size=ranks)
    log.info("dpo: computing reference log-probs of %d %s pairs (precompute_ref)",
             prepared.num_rows, prepared.split)
    for batch in passes:
        chosen, rejected = collect(batch)
        for index in range(int(batch["_num_pairs"])):
            source, row = int(batch["_source"][index]), int(batch["_row"][index])
            tables[source][:, row] = (float(chosen[index]), float(rejected[index]))
    flat = np.concatenate([t.ravel() for t in tables]) if tables else np.zeros(0)
    summed = np.asarray(job.backend.all_reduce_sum(flat.tolist()), dtype=np.float64)
    tables, start = [], 0
    for source in prepared.sources:
        size = 2 * source.plan.num_rows
        tables.append(summed[start:start + size].reshape(2, -1))
        start += size
    if cache.is_builder():
        _write_atomically(folder, {f"source{i}": t for i, t in enumerate(tables)})
    return tables


def _data_shard(job: Any) -> tuple[int, int]:
    shard = getattr(job.backend, "data_shard", None)
    return shard() if shard else (job.dist.rank, job.dist.world_size)


def _write_atomically(folder: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    if folder.is_dir():
        return
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez(tmp / "logps.npz", **arrays)
    try:
        os.rename(tmp, folder)
    except OSError:  # another node wrote it first: theirs holds the same numbers
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


class WithReferenceLogps:
    """Batches (train or eval) with each pair's precomputed reference log-probs attached.

    Everything else (``state_dict``, ``load_state_dict``, ``batches_per_epoch``,
    ``epoch``...) is the wrapped object's.
    """

    def __init__(self, batches: Any, tables: list[Any]):
        object.__setattr__(self, "_batches", batches)
        object.__setattr__(self, "_tables", tables)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        for batch in self._batches:
            chosen = torch.zeros(batch["_source"].shape[0], dtype=torch.float64)
            rejected = torch.zeros_like(chosen)
            for index in range(int(batch["_num_pairs"])):
                table = self._tables[int(batch["_source"][index])]
                row = int(batch["_row"][index])
                chosen[index], rejected[index] = float(table[0, row]), float(table[1, row])
            yield {**batch, REF_KEYS[0]: chosen, REF_KEYS[1]: rejected}

    def __len__(self) -> int:
        return len(self._batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batches, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._batches, name, value)
