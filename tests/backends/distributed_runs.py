"""Training runs for the backend tests: the real job, loop, checkpoints and export, with the
engine stand-ins (tiny Llama, next-token loss, SGD, list-backed data), on one process or
on several gloo processes on the CPU.

A run's losses come from its metrics.jsonl; before exporting, each run also writes the
trained model's logits on a fixed probe batch (``probe_logits.pt``), so a test can check
that the exported folder computes exactly what the trained model computed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import panda.job  # noqa: E402
from panda import recipe as recipe_io  # noqa: E402
from panda import registry  # noqa: E402
from standins import (exit_rank, free_port, register_standins, standin_build_data,  # noqa: E402
                      standin_recipe_data)

PROBE_LOGITS = "probe_logits.pt"
FORKSERVER_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint",
                      "transformers.models.llama.modeling_llama", "panda.job", "panda.train.loop",
                      "safetensors.torch"]
PROBE = torch.tensor([[1, 17, 42, 99, 5, 300, 7, 250, 3, 11, 480, 64]])


def recipe_data(output_dir: str, backend: dict[str, Any], *, steps: int, save_every: int = 0,
                batch_size: int, accumulation: int = 2, precision: str = "fp32") -> dict:
    """The stand-in recipe; ``batch_size`` is per process, so pass global / nproc."""
    data = standin_recipe_data(output_dir, per_device_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, max_steps=steps,
                               save_every=save_every, keep_last=5, precision=precision)
    data["backend"] = backend
    return data


def run(data: dict, *, nproc: int = 1, resume: str = "never") -> dict[str, Any]:
    """Train ``data`` (a recipe as data) on ``nproc`` processes; return losses and paths."""
    if nproc == 1:
        _train(data, resume)
    else:
        # A fork server imports torch and transformers once and forks every rank of every
        # run from there: much faster than spawn's fresh interpreters, and unlike a plain
        # fork it never copies a process whose OpenMP threads have already run. (Python
        # 3.11's fork server ignores sys.path, so it preloads installed modules only.)
        mp.set_forkserver_preload(FORKSERVER_PRELOAD)
        mp.start_processes(_worker, args=(nproc, free_port(), data, resume), nprocs=nproc,
                           join=True, start_method="forkserver")
    output = Path(data["run"]["output_dir"])
    records = [json.loads(line)
               for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["loss"] for r in records if "loss" in r},
            "grad_norms": {r["step"]: r["grad_norm"] for r in records if "loss" in r},
            "output": output, "final": output / "final"}


def _worker(rank: int, nproc: int, port: int, data: dict, resume: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    _train(data, resume)
    exit_rank()


def _train(data: dict, resume: str) -> None:
    """Train with the stand-in data and the export probe; both are undone afterwards, since
    a one-process run happens inside the test process (later tests need the real ones)."""
    register_standins()
    backend = registry.get("backend", data["backend"]["name"])
    original_build_data, original_export = panda.job.build_data, backend.export
    panda.job.build_data = standin_build_data(64)
    _probe_before_export(backend)
    try:
        panda.job.train(recipe_io.validate(data), resume=resume)
    finally:
        panda.job.build_data = original_build_data
        backend.export = original_export
        backend._probed = False


def _probe_before_export(backend_class: type) -> None:
    """Make ``export`` first save the trained model's logits on the probe batch (rank 0)."""
    if getattr(backend_class, "_probed", False):
        return
    export = backend_class.export

    def export_after_probe(self, path: str, tokenizer: Any) -> None:
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=PROBE.to(self.device)).logits.float().cpu()
        if self.dist.is_main:
            torch.save(logits, Path(path).parent / PROBE_LOGITS)
        export(self, path, tokenizer)

    backend_class.export = export_after_probe
    backend_class._probed = True


def exported_logits(folder: Path) -> torch.Tensor:
    """Logits of the exported Hugging Face folder on the probe batch, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def probe_logits(result: dict[str, Any]) -> torch.Tensor:
    """The trained model's logits on the probe batch, as the run saved them before export."""
    return torch.load(result["output"] / PROBE_LOGITS, weights_only=True)


def assert_export_matches_trained_model(result: dict[str, Any]) -> None:
    # fp32 weights written and read back unchanged; the only difference left is the
    # order of floating-point sums inside the forward pass.
    torch.testing.assert_close(exported_logits(result["final"]), probe_logits(result),
                               rtol=0, atol=1e-5)


def validation_error(*overrides: str) -> Any:
    """The RecipeError that ``panda recipe validate recipes/demo.toml --set ...`` reports."""
    import pytest

    from panda.errors import RecipeError
    from panda.recipe import load

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(RecipeError) as error:
        load(root / "recipes" / "demo.toml", list(overrides))
    return error.value


def assert_losses_close(actual: dict[int, float], expected: dict[int, float],
                        rel: float) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        assert abs(actual[step] - expected[step]) <= rel * abs(expected[step]), (
            f"step {step}: {actual[step]!r} vs {expected[step]!r}")


# -- fsdp: only rank 0 builds the model (load_on_rank0) --------------------------------------

def hf_recipe_data(output_dir: str, model: dict[str, Any], backend: dict[str, Any]) -> dict:
    """The stand-in recipe with the real ``hf`` model plugin (``model``: its [model] table)."""
    data = standin_recipe_data(output_dir)
    data["model"] = {"name": "hf", "dtype": "float32", "attn": "eager", **model}
    data["backend"] = backend
    return data


def built_and_filled_worker(rank: int, nproc: int, port: int, tmp: str,
                            models: list[dict[str, Any]]) -> None:
    """Per [model] table: build through the fsdp backend, set it up, and save (rank 0) which
    ranks built an empty model and every rank's logits of the sharded model on the probe."""
    from panda.backends.base import DistInfo
    from panda.job import Job
    from standins import StandinConstant, StandinLm, StandinSgd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    register_standins()
    for index, model_table in enumerate(models):
        recipe = recipe_io.validate(hf_recipe_data(tmp, model_table, {"name": "fsdp"}))
        backend = registry.get("backend", "fsdp")(recipe.backend.options)
        dist: DistInfo = backend.init_distributed()
        model = backend.build_model(registry.get("model", "hf")(recipe.model.options), recipe)
        empty = all(p.is_meta for p in model.parameters())
        job = Job(recipe=recipe, backend=backend, dist=dist, output_dir=Path(tmp), model=model,
                  method=StandinLm(), optimizer_plugin=StandinSgd(),
                  schedule_plugin=StandinConstant(), total_steps=1)
        backend.setup(job)
        backend.model.eval()
        with torch.no_grad():
            logits = backend.model(input_ids=PROBE).logits.float()
        built_empty, every_logits = [None] * nproc, [None] * nproc
        torch.distributed.all_gather_object(built_empty, empty)
        torch.distributed.all_gather_object(every_logits, logits)  # each rank's own forward
        if rank == 0:
            torch.save({"built_empty": built_empty, "logits": every_logits},
                       Path(tmp) / f"{index}.pt")
    exit_rank()


def whole_model_logits(tmp: str, model_table: dict[str, Any]) -> torch.Tensor:
    """The probe logits of the model the ``hf`` plugin builds whole, in this process."""
    register_standins()
    recipe = recipe_io.validate(hf_recipe_data(tmp, model_table, {"name": "single"}))
    model = registry.get("model", "hf")(recipe.model.options).build(recipe).eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()
