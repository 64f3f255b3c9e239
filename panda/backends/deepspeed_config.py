"""The DeepSpeed config of a run, generated from the recipe: the recipe stays the one truth.

panda writes every key that the recipe decides (batch sizes, accumulation,
clipping, precision, ZeRO stage and offload). An advanced user may add a JSON
``config_file`` for DeepSpeed's other knobs (bucket sizes, communication
dtype, activation checkpointing...). A key of that file that the recipe also
decides must agree with it (or say ``"auto"``, the Hugging Face convention);
otherwise the run stops with both values named. ``optimizer`` and
``scheduler`` sections are refused: panda's ``[optim]`` and ``[schedule]``
build those.

This module imports neither torch nor deepspeed: ``panda recipe validate``
uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from panda.errors import PandaError

# Where each DeepSpeed key the recipe decides comes from, for error messages.
RECIPE_SOURCES: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.per_device_batch_size x train.gradient_accumulation_steps x "
                        "data-parallel ranks",
    "gradient_clipping": "optim.max_grad_norm",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "backend.zero_stage",
    "zero_optimization.offload_optimizer.device": "backend.offload_optimizer",
    "zero_optimization.offload_optimizer.nvme_path": "backend.nvme_path",
    "zero_optimization.offload_param.device": "backend.offload_params",
    "zero_optimization.offload_param.nvme_path": "backend.nvme_path",
}
# Sections a config file may not carry, and the recipe section that owns each.
OWNED_SECTIONS = {"optimizer": "[optim]", "scheduler": "[schedule]"}
# Keys only known once the processes run; checked then, skipped at validation.
RUN_TIME_KEYS = {"train_batch_size"}


def recipe_values(recipe: Any, options: Any, data_parallel_size: int | None) -> dict[str, Any]:
    """The DeepSpeed keys the recipe decides, as dotted paths."""
    train = recipe.train
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": recipe.optim.max_grad_norm,
        "bf16.enabled": train.precision == "bf16",
        "fp16.enabled": train.precision == "fp16",
        "zero_optimization.stage": options.zero_stage,
    }
    if data_parallel_size is not None:
        values["train_batch_size"] = (train.per_device_batch_size *
                                      train.gradient_accumulation_steps * data_parallel_size)
    for option, key in (("offload_optimizer", "offload_optimizer"),
                        ("offload_params", "offload_param")):
        device = getattr(options, option, "none")
        if device != "none":
            values[f"zero_optimization.{key}.device"] = device
            if device == "nvme":
                values[f"zero_optimization.{key}.nvme_path"] = options.nvme_path
    return values


def panda_defaults(recipe: Any, options: Any, ds_cpu_adam: bool) -> dict[str, Any]:
    """Keys panda sets for its own way of driving the engine; a config file may change them."""
    values: dict[str, Any] = {
        "steps_per_print": 2**31 - 1,  # panda reports progress itself
        "wall_clock_breakdown": False,
        # panda's optimizer plugins (Lion, NVLAMB, SGD in tests...) are not on DeepSpeed's
        # list of tested ZeRO optimizers; they are plain torch optimizers and work.
        "zero_allow_untested_optimizer": True,
        # With offload, a torch optimizer steps on the CPU copy; allowed, only slower.
        "zero_force_ds_cpu_optimizer": ds_cpu_adam,
    }
    if recipe.train.precision == "fp16":
        values.update({"fp16.loss_scale": 0, "fp16.initial_scale_power": 16,
                       "fp16.loss_scale_window": 1000, "fp16.hysteresis": 2,
                       "fp16.min_loss_scale": 1})
    if recipe.train.precision == "bf16":
        # Skip a step whose gradients are not finite, as panda does in every precision.
        values["bf16.check_grad_overflow"] = True
    for option, key in (("offload_optimizer", "offload_optimizer"),
                        ("offload_params", "offload_param")):
        if getattr(options, option, "none") != "none":
            values[f"zero_optimization.{key}.pin_memory"] = options.pin_memory
    return values


def read_config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PandaError(f"backend.config_file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise PandaError(f"backend.config_file {path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise PandaError(f"backend.config_file {path} must hold a JSON object")
    return data


def conflicts(file_config: dict[str, Any], decided: dict[str, Any], path: str) -> list[str]:
    """Messages for each key of the file that contradicts the recipe (empty: none)."""
    problems = [f"{path} has an \"{section}\" section; panda builds it from the recipe's "
                f"{owner}: remove it from the file" for section, owner in OWNED_SECTIONS.items()
                if section in file_config]
    flat = flatten(file_config)
    for key, wanted in decided.items():
        if key not in flat or flat[key] == "auto":
            continue
        if not _same(flat[key], wanted):
            problems.append(f"{path} sets {key} = {json.dumps(flat[key])} but the recipe's "
                            f"{RECIPE_SOURCES[key]} gives {json.dumps(wanted)}; change one "
                            "of them (or write \"auto\" in the file)")
    return problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check_config_file(recipe: Any, options: Any) -> None:
    """Validation-time check of ``config_file`` (world size unknown yet: batch total skipped)."""
    if not options.config_file:
        return
    file_config = read_config_file(options.config_file)
    decided = {k: v for k, v in recipe_values(recipe, options, None).items()
               if k not in RUN_TIME_KEYS}
    problems = conflicts(file_config, decided, options.config_file)
    if problems:
        raise ValueError(problems[0])


def build_config(recipe: Any, options: Any, data_parallel_size: int,
                 ds_cpu_adam: bool = False) -> dict[str, Any]:
    """The full DeepSpeed config: panda's defaults < the config file < the recipe's values."""
    decided = recipe_values(recipe, options, data_parallel_size)
    merged = flatten(panda_defaults(recipe, options, ds_cpu_adam))
    if options.config_file:
        file_config = read_config_file(options.config_file)
        problems = conflicts(file_config, decided, options.config_file)
        if problems:
            raise PandaError(problems[0], hint="the recipe is the source of truth for these "
                             "keys; the config file may only add others")
        merged.update({k: v for k, v in flatten(file_config).items() if v != "auto"})
    merged.update(decided)
    return unflatten(merged)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        target = out
        *parents, last = name.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return out
