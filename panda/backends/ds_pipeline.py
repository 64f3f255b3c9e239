"""``ds-pipeline``: DeepSpeed pipeline parallelism for LLaMA-family models (PP x DP).

The model is a DeepSpeed ``PipelineModule`` built from LayerSpecs
(``panda.models.pipeline_layers``), so each rank materialises only the layers
of its stage, and reads only their weights (from a pipeline folder or an HF
safetensors folder). With ``world_size = num_stages x dp`` ranks, rank ``r``
is stage ``r // dp`` of data-parallel replica ``r % dp`` (DeepSpeed's
``PipeDataParallelTopology``); the data sampler is sharded over the ``dp``
replicas only, so every stage of a replica steps through the same batches.

The job asks this backend for two things a pipeline changes (``build_model``
and ``data_shard``); the rest of the run is the ``deepspeed`` backend's:
config from the recipe, checkpoints, resume. One optimizer step is
``engine.train_batch`` over an iterator of the step's micro-batches; only
the first stage (inputs) and the last stage (labels) consume it, and middle
stages do not even read their rows (``skip_reading``).

Loss normalisation (DESIGN section 6): the last stage's loss function returns
each micro-batch's token-loss sum times ``gas x dp / units``; DeepSpeed then
divides by the accumulation steps and averages over the data-parallel ranks,
which leaves the gradient of the step's token mean. The reported loss is
summed exactly (float64) from the unscaled sums.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from panda.backends.base import DistInfo
from panda.backends.deepspeed import DeepSpeed, cache_restored, write_hf_meta
from panda.errors import PandaError
from panda.plugins.api import Options
from panda.recipe_schema import InvalidKey

PARTITION_METHODS = ("layers", "parameters", "uniform")


class PipelineOptions(Options):
    num_stages: int = Field(2, ge=1, description="Pipeline stages; the world size must be a "
                            "multiple (the rest is data parallelism: PP x DP).")
    partition_method: str = Field("layers", description="How layers are split over stages: "
                                  "layers (decoder layers evenly; embedding on the first "
                                  "stage, head on the last), parameters (balanced parameter "
                                  "counts; builds every layer once on every rank to count), "
                                  "uniform (layer count), or type:CLASSNAME.")
    activation_checkpoint_interval: int = Field(0, ge=0, description="Recompute activations "
                                                "every N layers in backward; 0 = off.")
    zero_stage: int = Field(0, description="0, or 1 to shard optimizer state over the "
                            "data-parallel ranks (ZeRO-2/3 cannot run under a pipeline).")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Keep optimizer "
                                                      "state on the CPU (needs zero_stage 1; "
                                                      "not with bf16).")
    pin_memory: bool = Field(True, description="Pin offloaded CPU memory.")
    cpu_adam: bool = Field(True, description="With offload_optimizer and optim.name = "
                           "'adamw', step with DeepSpeedCPUAdam.")
    config_file: Optional[str] = Field(None, description="Advanced: a DeepSpeed JSON config "
                                       "merged in; keys the recipe decides must agree.")

    @model_validator(mode="after")
    def _fits_a_pipeline(self) -> "PipelineOptions":
        if self.zero_stage in (2, 3):
            raise InvalidKey("zero_stage", f"ZeRO-{self.zero_stage} partitions gradients, which "
                             "DeepSpeed's pipeline engine cannot do; use zero_stage 0 or 1, or "
                             "backend.name = \"deepspeed\" for ZeRO-2/3 without a pipeline")
        if self.zero_stage not in (0, 1):
            raise InvalidKey("zero_stage", f"zero_stage must be 0 or 1 (got {self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage != 1:
            raise InvalidKey("offload_optimizer", "optimizer offload needs zero_stage = 1")
        method = self.partition_method
        if method not in PARTITION_METHODS and not method.startswith("type:"):
            raise InvalidKey("partition_method", f"unknown partition_method '{method}'; use "
                             f"{', '.join(PARTITION_METHODS)} or type:CLASSNAME")
        return self


class DsPipeline(DeepSpeed):
    """DeepSpeed pipeline parallelism (x data parallelism) for LLaMA, Mistral and Qwen2 models."""

    Options = PipelineOptions

    @classmethod
    def check_recipe(cls, options: PipelineOptions, recipe: Any) -> None:
        from panda.backends.deepspeed_config import check_config_file

        for problem in pipeline_recipe_problems(options, recipe):
            raise problem
        check_config_file(recipe, options)

    # -- process layout -------------------------------------------------------------------
    def init_distributed(self) -> DistInfo:
        dist = super().init_distributed()
        stages = self.options.num_stages
        if dist.world_size % stages:
            raise PandaError(f"backend.num_stages = {stages} does not divide the "
                             f"{dist.world_size} processes",
                             hint="start a multiple of num_stages processes (--nproc)")
        self.dp_size = dist.world_size // stages
        # DeepSpeed's PipeDataParallelTopology: rank = stage * dp + data-parallel rank
        self.stage, self.dp_rank = divmod(dist.rank, self.dp_size)
        return dist

    @property
    def data_parallel_size(self) -> int:
        return self.dp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.options.num_stages - 1

    def data_shard(self) -> tuple[int, int]:
        """This rank's share of the data: its replica's, the same on every stage of it."""
        return self.dp_rank, self.dp_size

    # -- the model: only this stage's layers ------------------------------------------------
    def build_model(self, model_plugin: Any, recipe: Any) -> Any:
        from panda.models.pipeline_model import build_pipeline_module

        self.loss = TokenSumLoss()
        options = self.options
        return build_pipeline_module(
            model_plugin, recipe, num_stages=options.num_stages, stage=self.stage,
            partition_method=_deepspeed_partition(options.partition_method),
            activation_checkpoint_interval=options.activation_checkpoint_interval,
            loss_fn=self.loss)

    def setup(self, job: Any) -> None:
        super().setup(job)
        self.loss.device = self.device
        if not (self.is_first_stage or self.is_last_stage):
            for batches in (job.train_batches, job.eval_batches):
                skip_reading(batches)

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        import math

        from panda.data.batches import token_slots

        engine = self.engine
        # One last stage per replica: summing its counts over all ranks counts each once.
        if self.is_last_stage:
            local = [sum(int(self.method.units(b)) for b in micro_batches),
                     sum(token_slots(b) for b in micro_batches)]
        else:
            local = [0, 0]
        units, tokens = self.all_reduce_sum(local)
        lr = float(self.scheduler.get_last_lr()[0])
        if units == 0:
            self.scheduler.step()
            return {"loss": 0.0, "grad_norm": 0.0, "lr": lr, "units": 0.0, "tokens": tokens,
                    "nonfinite": 0.0}
        if len(micro_batches) != engine.micro_batches:
            raise PandaError(f"a pipeline step takes exactly {engine.micro_batches} "
                             f"micro-batches (got {len(micro_batches)})")
        # DeepSpeed divides the last stage's loss by its accumulation steps and averages
        # gradients over the data-parallel replicas; this scale undoes both.
        self.loss.begin(scale=engine.micro_batches * self.dp_size / units)
        engine.train_batch(data_iter=iter([pipeline_batch(b) for b in micro_batches]))
        loss = self.all_reduce_sum([self.loss.recorded_sum])[0] / units
        reported = engine.get_global_grad_norm()
        grad_norm = float(reported) if reported is not None else 0.0
        nonfinite = not math.isfinite(loss)
        if self.precision != "fp16":
            nonfinite = nonfinite or not engine.was_step_applied() or not math.isfinite(grad_norm)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "units": units,
                "tokens": tokens, "nonfinite": float(nonfinite)}

    def eval_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        self.loss.begin(scale=1.0)
        self.engine.eval_batch(iter([pipeline_batch(batch)]), num_micro_batches=1,
                               bcast_loss=False)
        # Only the last stage computed it; the loop sums over ranks.
        return self.loss.recorded_sum, self.loss.recorded_units

    # -- export ---------------------------------------------------------------------------
    def export(self, path: str, tokenizer: Any) -> None:
        """Each stage writes its layers (one replica), then rank 0 joins them into an HF folder."""
        from safetensors.torch import save_file

        from panda.models.pipeline_weights import iter_layer_states, layer_file, pipeline_to_hf

        final = Path(path)
        layers = final.parent / f".{final.name}.layers"
        if self.dist.is_main:
            shutil.rmtree(layers, ignore_errors=True)
            layers.mkdir(parents=True)
            with cache_restored(self):
                write_hf_meta(self.engine.module, tokenizer, layers)
        self.barrier()
        if self.dp_rank == 0:
            for index, state in iter_layer_states(self.engine.module, self.stage):
                save_file(state, layer_file(layers, index), metadata={"format": "pt"})
        self.barrier()
        if self.dist.is_main:
            dtype = str(self.export_dtype).removeprefix("torch.") if self.export_dtype else None
            pipeline_to_hf(str(layers), str(final), dtype=dtype)
            shutil.rmtree(layers)
        self.barrier()


class TokenSumLoss:
    """The pipeline's ``loss_fn``: the fp32 token-loss sum of a micro-batch, times ``scale``.

    It also keeps the unscaled sums and target counts of the current step (float64),
    from which the backend reports the exact loss.
    """

    __name__ = "token_sum_loss"

    def __init__(self) -> None:
        self.scale = 1.0
        self.device: Any = "cpu"
        self.recorded_sum = 0.0
        self.recorded_units = 0

    def begin(self, scale: float) -> None:
        self.scale = scale
        self.recorded_sum, self.recorded_units = 0.0, 0

    def __call__(self, logits: Any, labels: Any) -> Any:
        from panda.plugins.methods.lm_loss import causal_lm_loss_sum

        total, count = causal_lm_loss_sum(logits, labels)
        self.recorded_sum += float(total.detach().double())
        self.recorded_units += int(count)
        return total * self.scale


def pipeline_batch(batch: dict[str, Any]) -> tuple[tuple[Any, Any], Any]:
    """``((input_ids, position_ids), labels)``: what the first and last stages consume."""
    import torch

    input_ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids).contiguous()
    return (input_ids, positions), batch["labels"]


def skip_reading(batches: Any) -> None:
    """Make a middle stage's batches keep their place without reading rows.

    The loop still draws one micro-batch per accumulation step on every rank, so the
    sampler's position (and its checkpointed state) stays that of the stages that feed
    the pipeline; a middle stage gets one token of padding instead of the rows.
    """
    import torch

    if batches is None or not hasattr(batches, "_collate"):
        return

    def placeholder(sources: Any, rows: Any) -> dict[str, Any]:
        count = max(len(rows), 1)
        return {"input_ids": torch.zeros((count, 1), dtype=torch.long),
                "labels": torch.full((count, 1), -100, dtype=torch.long)}

    batches._collate = placeholder


def _deepspeed_partition(method: str) -> str:
    from panda.models.pipeline_layers import DECODER_TYPE

    return f"type:{DECODER_TYPE}" if method == "layers" else method


def pipeline_recipe_problems(options: PipelineOptions, recipe: Any) -> list[InvalidKey]:
    """Settings a DeepSpeed pipeline cannot honour, each naming its key."""
    from panda import registry
    from panda.plugins.methods.lm import CausalLm

    problems = []
    if recipe.model.name != "hf":
        problems.append(InvalidKey(("model", "name"), "ds-pipeline builds LLaMA-family models "
                                   "itself; it needs model.name = \"hf\""))
    else:
        model_type = _model_type(recipe.model.options)
        if model_type is not None and model_type not in ("llama", "mistral", "qwen2"):
            problems.append(InvalidKey(("model",), f"ds-pipeline supports llama, mistral and "
                                       f"qwen2 models, not '{model_type}'"))
        if recipe.model.options.gradient_checkpointing:
            problems.append(InvalidKey(("model", "gradient_checkpointing"), "under ds-pipeline, "
                                       "use backend.activation_checkpoint_interval instead"))
    if recipe.lora is not None:
        problems.append(InvalidKey(("lora",), "LoRA is not supported with ds-pipeline; use "
                                   "backend.name = \"deepspeed\" (ZeRO) or \"fsdp\""))
    if recipe.quant is not None:
        problems.append(InvalidKey(("quant",), "quantized (QLoRA) training is not supported "
                                   "with ds-pipeline"))
    method = registry.get("method", recipe.method.name)
    if not (isinstance(method, type) and issubclass(method, CausalLm)):
        problems.append(InvalidKey(("method", "name"), f"ds-pipeline trains next-token methods "
                                   f"(pretrain, sft), not '{recipe.method.name}'"))
    elif getattr(recipe.method.options, "neftune_alpha", 0) > 0:
        problems.append(InvalidKey(("method", "neftune_alpha"), "NEFTune noise is not "
                                   "supported with ds-pipeline; set it to 0"))
    precision = recipe.train.precision
    if options.offload_optimizer != "none" and precision == "bf16":
        problems.append(InvalidKey(("backend", "offload_optimizer"), "DeepSpeed cannot offload "
                                   "the optimizer of a pipeline in train.precision = \"bf16\" "
                                   "(its bf16 optimizer has no offload); use fp16, or no "
                                   "offload"))
    if precision == "fp32" and options.zero_stage == 0:
        problems.append(InvalidKey(("backend", "zero_stage"), "an fp32 pipeline needs "
                                   "zero_stage = 1: without ZeRO, DeepSpeed 0.19 clips by the "
                                   "gradient norm of the first stage only"))
    if recipe.train.compile:
        problems.append(InvalidKey(("train", "compile"), "train.compile is not supported with "
                                   "ds-pipeline; set it to false"))
    return problems


def _model_type(model_options: Any) -> str | None:
    """The architecture a recipe names, when known without loading weights."""
    from panda.models.presets import PRESETS

    if getattr(model_options, "preset", None):
        return PRESETS[model_options.preset].get("model_type")
    path = getattr(model_options, "path", None)
    if path and (Path(path) / "config.json").is_file():
        import json

        try:
            return json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    return None
