"""Training metrics: a progress bar or log lines, metrics.jsonl, TensorBoard, wandb.

Only rank 0 reports. Per logged step: loss, grad norm, lr, tokens/s, MFU and
peak memory. MFU counts 6N FLOPs per token for the matmul weights (forward
plus backward) plus the attention scores term 12 * layers * hidden * seq
(PaLM, appendix B), against the device's dense peak from ``PEAK_TFLOPS`` or
``train.peak_tflops``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense peak TFLOP/s per device name fragment: (bf16/fp16 tensor cores, fp32 -- tf32 off).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 125.0, 31.2),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.0, 82.6),
    ("V100", 125.0, 15.7),
]


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device, or None when unknown (MFU is then not reported)."""
    if override:
        return override
    for fragment, half, single in PEAK_TFLOPS:
        if fragment in device_name:
            return single if precision == "fp32" else half
    return None


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in matmuls: all but input embeddings (a lookup).

    A parameter that DeepSpeed ZeRO-3 partitioned is empty on this rank; ``ds_numel``
    holds its full size. A pipeline stage holds a few layers; its module says the whole
    model's count (``matmul_parameter_count``).
    """
    whole_model = getattr(model, "matmul_parameter_count", None)  # a pipeline stage's module
    if whole_model:
        return int(whole_model)
    total = sum(_full_numel(p) for p in model.parameters())
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if embed is not None and (output is None or output.weight is not embed.weight):
        total -= _full_numel(embed.weight)
    return total


def _full_numel(param: Any) -> int:
    return int(getattr(param, "ds_numel", None) or param.numel())


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * layers * hidden * seq_len."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    return 6.0 * matmul_parameters(model) + 12.0 * layers * hidden * seq_len


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def peak_memory_gb(device: str) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens/s and MFU since the previous report."""

    def __init__(self, flops_per_token_fn: Any, peak: float | None, world_size: int):
        self.flops_per_token_fn = flops_per_token_fn
        self.peak = peak
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, tokens: int, seq_len: int) -> None:
        self.tokens += tokens
        self.flops += tokens * self.flops_per_token_fn(seq_len)

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = {"tokens_per_s": self.tokens / elapsed}
        if self.peak:
            values["mfu"] = self.flops / elapsed / (self.peak * 1e12 * self.world_size)
        self.reset()
        return values


# -- sinks ----------------------------------------------------------------------------------

class JsonlSink:
    def __init__(self, path: Path, resume_step: int):
        if resume_step and path.exists():
            # Lines logged after the checkpoint we resume from belong to a run that was cut
            # off; the resumed run logs those steps again.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, step: int, values: dict[str, Any]) -> None:
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class TensorBoardSink:
    def __init__(self, folder: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a cut-off run wrote after the checkpoint.
        purge_step = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_")
                                       else f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, output_dir: Path, project: str | None, name: str, config: dict):
        from panda.errors import PandaError

        try:
            import wandb
        except ImportError:
            raise PandaError("log.wandb = true needs the wandb package",
                             hint="pip install wandb, or set log.wandb = false") from None
        id_file = output_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=project or "panda", name=name, id=run_id, resume="allow",
                              config=config, dir=str(output_dir))

    def write(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


# -- console ----------------------------------------------------------------------------------

def format_values(values: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"),
                     ("eval_ppl", "eval_ppl {:.2f}"), ("grad_norm", "grad {:.3f}"),
                     ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("mfu", "mfu {:.1%}"), ("peak_mem_gb", "mem {:.2f} GB")):
        if key in values:
            parts.append(fmt.format(values[key]))
    return " | ".join(parts)


class Console:
    """A rich progress bar on a terminal; plain lines (for logs and CI) otherwise."""

    def __init__(self, total_steps: int, start_step: int, stream: Any = None):
        self.stream = stream or sys.stdout
        self.total = total_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        self.progress = None
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console as RichConsole
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=RichConsole(file=self.stream))
            self.task = self.progress.add_task("train", total=total_steps,
                                               completed=start_step, info="")
            self.progress.start()

    def advance(self, step: int, values: dict[str, Any] | None) -> None:
        if self.progress is not None:
            update = {"completed": step}
            if values:
                update["info"] = format_values(values)
            self.progress.update(self.task, **update)
        elif values:
            self.line(f"step {step}/{self.total} | {format_values(values)} | eta "
                      f"{self.eta(step)}")

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.started) / done * (self.total - step)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class MetricsLogger:
    """Fans each report out to the console and the enabled sinks (rank 0 only)."""

    def __init__(self, output_dir: str | Path, log: Any, *, is_main: bool, total_steps: int,
                 resume_step: int = 0, run_name: str = "panda", config: dict | None = None):
        self.enabled = is_main
        self.sinks: list[Any] = []
        self.console = None
        if not is_main:
            return
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.console = Console(total_steps, resume_step)
        if log.jsonl:
            self.sinks.append(JsonlSink(folder / METRICS_FILE, resume_step))
        if log.tensorboard:
            self.sinks.append(TensorBoardSink(folder / TENSORBOARD_DIR, resume_step))
        if log.wandb:
            self.sinks.append(WandbSink(folder, log.wandb_project, run_name, config or {}))

    def step(self, step: int, values: dict[str, Any] | None) -> None:
        """Advance the progress bar; ``values`` (on logged steps) also go to every sink."""
        if not self.enabled:
            return
        self.console.advance(step, values)
        if values:
            for sink in self.sinks:
                sink.write(step, values)

    def eval(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.console.line(f"eval at step {step} | {format_values(values)}")
        for sink in self.sinks:
            sink.write(step, values)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.line(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.console.close()
        for sink in self.sinks:
            sink.close()
