"""The Recipe: one pydantic model per TOML section (DESIGN §4).

Sections that name a plugin (``[model]``, ``[method]``, ``[optim]``,
``[schedule]``, ``[backend]``, each ``[[data.sources]]``) hold the keys every
plugin of that kind shares; the remaining keys of the section are the plugin's
own ``Options`` and are validated by it (see ``panda.recipe``). This module
imports pydantic only: validating a recipe never imports torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema


class InvalidKey(ValueError):
    """A model validator's complaint about one key (path relative to the model).

    Plain ValueErrors from model validators carry no location, so their errors
    would point at the section header; this one lets the loader name the key
    and its line. Plugins' ``Options`` validators may raise it too.
    """

    def __init__(self, key: str | tuple, message: str):
        super().__init__(message)
        self.key = (key,) if isinstance(key, str) else tuple(key)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class PluginSection(Section):
    """Shared keys of a section that names a plugin; ``options`` holds the plugin's own."""

    kind: ClassVar[str]
    name: str
    options: SkipJsonSchema[Any] = Field(default=None, exclude=True)

    def dump(self) -> dict[str, Any]:
        own = self.options.model_dump(mode="json") if self.options is not None else {}
        return {**self.model_dump(mode="json"), **own}


class RunSection(Section):
    name: str = Field("panda", min_length=1, description="Run name; names the output folder.")
    output_dir: Optional[str] = Field(None, description="Where checkpoints, logs and the "
                                      "exported model go. Default: runs/<name>.")
    seed: int = Field(42, ge=0, description="Seed of every random generator.")

    @model_validator(mode="after")
    def _default_output_dir(self) -> "RunSection":
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        return self


class ModelSection(PluginSection):
    kind: ClassVar[str] = "model"
    name: str = Field("hf", description="Model plugin.")


class TokenizerSection(Section):
    path: Optional[str] = Field(None, description="Tokenizer folder; default: model.path.")
    chat_template: Optional[str] = Field(None, description="Jinja chat template, or the name "
                                         "of a built-in template; default: the tokenizer's.")


class SourceSection(PluginSection):
    kind: ClassVar[str] = "dataset"
    name: str = Field(description="Dataset plugin (record format).")
    path: Union[str, list[str], None] = Field(None, description="File, directory or glob "
                                              "(or a list of them); default: the format's own.")
    weight: float = Field(1.0, ge=0, description="Sampling weight relative to other sources.")


class DataSection(Section):
    max_seq_length: int = Field(2048, gt=0, description="Tokens per packed row / example.")
    packing: bool = Field(True, description="Pack several documents per row (no "
                          "cross-document attention).")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    prefetch_factor: int = Field(2, gt=0, description="Batches prefetched per worker.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the data held out "
                                 "for evaluation.")
    on_bad_record: Literal["error", "skip"] = Field("error", description="Stop at a malformed "
                                                    "record, or skip it and report counts.")
    sources: list[SourceSection] = Field(min_length=1, description="Training data sources.")
    eval_sources: list[SourceSection] = Field(default_factory=list, description="Held-out "
                                              "evaluation data.")

    @model_validator(mode="after")
    def _some_weight(self) -> "DataSection":
        if not any(source.weight > 0 for source in self.sources):
            raise InvalidKey("sources", "every source has weight 0; give at least one a "
                             "positive weight")
        return self


class MethodSection(PluginSection):
    kind: ClassVar[str] = "method"
    name: str = Field("sft", description="Training method.")


class OptimSection(PluginSection):
    kind: ClassVar[str] = "optimizer"
    name: str = Field("adamw", description="Optimizer plugin.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied "
                                "to biases and norm weights).")
    max_grad_norm: float = Field(0.3, ge=0, description="Clip the global gradient norm; 0 = off.")


class ScheduleSection(PluginSection):
    kind: ClassVar[str] = "scheduler"
    name: str = Field("warmup", description="Learning-rate schedule.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    warmup_proportion: float = Field(0.0, ge=0, lt=1, description="Warm-up as a share of all "
                                     "steps; when set, it replaces warmup_steps.")

    @model_validator(mode="after")
    def _one_warmup(self) -> "ScheduleSection":
        if {"warmup_steps", "warmup_proportion"} <= self.model_fields_set and \
                self.warmup_steps > 0 and self.warmup_proportion > 0:
            raise InvalidKey("warmup_proportion", "set warmup_steps or warmup_proportion, "
                             "not both")
        if self.warmup_proportion > 0 and "warmup_steps" not in self.model_fields_set:
            self.warmup_steps = 0  # the proportion replaces the default step count
        return self


class TrainSection(Section):
    per_device_batch_size: int = Field(1, gt=0, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(64, gt=0, description="Micro-batches per "
                                             "optimizer step.")
    num_epochs: float = Field(1, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; "
                           "-1 = use num_epochs.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="bf16/fp16: "
                                                       "autocast with fp32 master weights.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 = never.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps; 0 = only at the end.")
    keep_last: int = Field(3, gt=0, description="Checkpoints kept.")
    log_every: int = Field(10, gt=0, description="Log metrics every N steps.")
    compile: bool = Field(False, description="torch.compile the model.")
    peak_tflops: Optional[float] = Field(None, gt=0, description="Device peak TFLOP/s for MFU; "
                                         "default: from panda's device table.")

    @model_validator(mode="after")
    def _steps(self) -> "TrainSection":
        if self.max_steps == 0:
            raise InvalidKey("max_steps", "max_steps = 0 trains nothing; use -1 to train "
                             "num_epochs")
        return self


class BackendSection(PluginSection):
    kind: ClassVar[str] = "backend"
    name: str = Field("auto", description="Training backend; auto = single on one device, "
                      "ddp on several.")


class LoraSection(Section):
    r: int = Field(64, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear", description="Module names to adapt; all-linear = every linear layer of "
        "the blocks.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in "
                                       "full and saved with the adapter.")


class QuantSection(Section):
    bits: Literal[4, 8] = Field(4, description="Bits of the frozen base weights.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


class LogSection(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    jsonl: bool = Field(True, description="Write metrics.jsonl.")
    wandb: bool = Field(False, description="Log to Weights & Biases.")
    wandb_project: Optional[str] = Field(None, description="W&B project; default: panda.")


class Recipe(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    lora: Optional[LoraSection] = Field(None, description="Present = LoRA on.")
    quant: Optional[QuantSection] = Field(None, description="Present = quantized base (QLoRA).")
    log: LogSection = Field(default_factory=LogSection)

    def plugin_sections(self) -> list[tuple[tuple, PluginSection]]:
        """(key path, section) of every section that names a plugin."""
        found: list[tuple[tuple, PluginSection]] = [
            (("model",), self.model), (("method",), self.method), (("optim",), self.optim),
            (("schedule",), self.schedule), (("backend",), self.backend)]
        for field_name in ("sources", "eval_sources"):
            for index, source in enumerate(getattr(self.data, field_name)):
                found.append((("data", field_name, index), source))
        return found

    def dump(self) -> dict[str, Any]:
        """The resolved recipe as plain TOML-ready data (plugin options flattened in)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for path, section in self.plugin_sections():
            target = data
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = {k: v for k, v in section.dump().items() if v is not None}
        return data


# Plugin sections by top-level key; [[data.sources]] entries are handled by path.
PLUGIN_SECTIONS: dict[str, type[PluginSection]] = {
    "model": ModelSection, "method": MethodSection, "optim": OptimSection,
    "schedule": ScheduleSection, "backend": BackendSection,
}
