"""LoRA and QLoRA training throughput: panda against a plain Hugging Face + peft loop.

One randomly initialised Llama-3-8B-shaped checkpoint (preset ``llama3-8b``, bf16
safetensors in a temporary folder) is the starting point of four variants, run
one after the other in one process on the same random token batches:

* ``hf+peft lora``: ``from_pretrained`` in bf16, gradient checkpointing, peft
  ``get_peft_model`` (r 16, alpha 32, dropout 0.05, ``all-linear``), bf16 autocast,
  ``model(..., labels=...).loss``, backward, clip at 1.0, fused AdamW: the loop of
  the peft examples.
* ``panda lora``: the same recipe through panda (the ``hf`` model plugin loading
  ``model.path``, ``panda.adapters.apply_lora``, the ``sft`` method and the
  ``single`` backend's real ``train_step``, whose numbers are read on the host one
  step later, as ``panda train``'s loop reads them).
* ``hf+peft qlora`` / ``panda qlora``: the same with the base loaded in 4-bit NF4
  with double quantization and bf16 compute; the baseline runs peft's
  ``prepare_model_for_kbit_training``, panda its ``[quant]`` path.

Each variant reports tokens/s (timed after warm-up steps, device synchronised)
and the peak GPU memory of training (the loaded model included; the load's own
transient peak is not); then panda / baseline for speed and memory. With
``--rounds 2`` (the default on a GPU) each pair runs twice, in the order
baseline-panda then panda-baseline, and the figures are the means: a GPU that
warms up or down over the run then favours neither side.

    python benchmarks/lora_throughput.py          # a GPU host with peft and bitsandbytes
    python benchmarks/lora_throughput.py --tiny   # any CPU: proves the harness (LoRA only)

Each GPU run appends one JSON line to benchmarks/results.jsonl (``--results PATH``
elsewhere; --tiny writes nowhere unless --results is given).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, RESULTS, append_record, peak_memory_gb,  # noqa: E402
                          panda_single_step, pick_device, reset_memory, timed_steps, utc_now,
                          versions)
LR, MAX_GRAD_NORM = 1e-4, 1.0


def save_checkpoint(preset: str, folder: Path, device: str, dtype: Any) -> int:
    """A random model of ``preset``'s shape saved as safetensors (+ the tiny tokenizer,
    which panda's model plugin loads next to it); returns its vocabulary size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models import tiny_tokenizer
    from panda.models.presets import PRESETS

    fields = dict(PRESETS[preset])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, max_shard_size="5GB")
    tiny_tokenizer.load().save_pretrained(folder)
    del model
    return config.vocab_size


def random_batches(count: int, batch: int, seq: int, vocab: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone(),
                        "position_ids": torch.arange(seq).expand(batch, seq).clone()})
    return batches


# -- the baseline: transformers + peft, written the way their examples are -------------------

def hf_peft_step(folder: Path, args: argparse.Namespace, device: str, quant: bool
                 ) -> Callable[[dict], float]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    extra = {}
    if quant:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": device}, **extra)
    checkpointing = {"use_reentrant": False}
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, fused=on_gpu)
    model.train()

    def step(batch: dict) -> float:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model
    return step


# -- panda: the recipe's path ----------------------------------------------------------------

def panda_step(folder: Path, args: argparse.Namespace, device: str, quant: bool
               ) -> Callable[[dict], float]:
    """What ``panda train`` builds for this recipe (job.build_job, steps 4, 6 and 7)."""
    from panda import recipe as recipe_io
    from panda import registry
    from panda.adapters import apply_lora

    on_gpu = device.startswith("cuda")
    data = {
        "model": {"path": str(folder), "dtype": "bfloat16" if on_gpu else "float32",
                  "attn": "sdpa", "gradient_checkpointing": True},
        "data": {"sources": [{"name": "pretrain", "path": "synthetic"}], "packing": False},
        "method": {"name": "sft"},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05,
                 "target_modules": "all-linear"},
        "optim": {"name": "adamw", "lr": LR, "max_grad_norm": MAX_GRAD_NORM},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"precision": "bf16" if on_gpu else "fp32", "gradient_accumulation_steps": 1},
        "backend": {"name": "single"}}
    if quant:
        data["quant"] = {"bits": 4, "type": "nf4", "double_quant": True}
    recipe = recipe_io.validate(data)
    model_plugin = registry.get("model", recipe.model.name)(recipe.model.options)
    model = apply_lora(model_plugin.build(recipe), recipe.lora, recipe.quant)
    method = registry.get("method", recipe.method.name)(recipe.method.options)
    model = method.prepare(model, SimpleNamespace(recipe=recipe))
    return panda_single_step(recipe, model, method, device)


# -- measuring ----------------------------------------------------------------------------------

def measure(name: str, make_step: Callable, folder: Path, batches: list[dict],
            args: argparse.Namespace, device: str, quant: bool) -> dict[str, Any]:
    """One variant, built from the checkpoint and timed over ``args.steps`` steps."""
    reset_memory(device)
    started = time.perf_counter()
    step = make_step(folder, args, device, quant)
    load_s = time.perf_counter() - started
    reset_memory(device)  # the training peak: the model is resident, the load's transient is not
    trainable = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
    losses, _, elapsed = timed_steps(step, batches, args.warmup, device)
    tokens = args.steps * args.micro_batch * args.seq
    result = {"variant": name, "tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps,
              "load_s": load_s, "trainable_parameters": trainable,
              "first_loss": losses[0], "last_loss": float(losses[-1])}
    if device.startswith("cuda"):
        result["peak_mem_gb"] = peak_memory_gb(device)
    del step
    gc.collect()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-llama, short sequences, CPU "
                        "if there is no GPU, LoRA only: checks the harness, measures nothing")
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--no-qlora", action="store_true", help="skip the 4-bit variants")
    parser.add_argument("--rounds", type=int, default=None, help="times each pair runs, the "
                        "order reversed every other round (default: 2 on a GPU, 1 with --tiny)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"append the JSON line here (default: {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.seq, args.micro_batch = "tiny-llama", 64, 2
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    if args.rounds is None:
        args.rounds = 1 if args.tiny else 2
    return args


def variants(device: str, no_qlora: bool, rounds: int) -> list[tuple[str, Callable, bool]]:
    """The runs in order: each (baseline, panda) pair ``rounds`` times, reversed every
    other round."""
    pairs = [[("hf+peft lora", hf_peft_step, False), ("panda lora", panda_step, False)]]
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if device.startswith("cuda") and have_bnb and not no_qlora:
        pairs.append([("hf+peft qlora", hf_peft_step, True), ("panda qlora", panda_step, True)])
    elif not no_qlora:
        print("skipping the QLoRA variants: they need a CUDA GPU and bitsandbytes",
              file=sys.stderr)
    return [run for pair in pairs for round_ in range(rounds)
            for run in (pair if round_ % 2 == 0 else pair[::-1])]


def mean_by_variant(runs: list[dict]) -> list[dict]:
    """One result per variant: the rounds' mean speed, their largest peak, every round kept."""
    merged: dict[str, dict] = {}
    for run in runs:
        merged.setdefault(run["variant"], {**run, "rounds": []})["rounds"].append(run)
    for result in merged.values():
        rounds = result["rounds"]
        result["tokens_per_s"] = sum(r["tokens_per_s"] for r in rounds) / len(rounds)
        result["step_s"] = sum(r["step_s"] for r in rounds) / len(rounds)
        if "peak_mem_gb" in result:
            result["peak_mem_gb"] = max(r["peak_mem_gb"] for r in rounds)
        result["rounds"] = [{k: r[k] for k in ("tokens_per_s", "peak_mem_gb") if k in r}
                            for r in rounds]
    return list(merged.values())


def ratios_of(results: list[dict]) -> dict[str, float]:
    by_name = {r["variant"]: r for r in results}
    ratios = {}
    for kind in ("lora", "qlora"):
        panda, base = by_name.get(f"panda {kind}"), by_name.get(f"hf+peft {kind}")
        if panda is None or base is None:
            continue
        ratios[f"{kind}_speed_panda_over_hf"] = panda["tokens_per_s"] / base["tokens_per_s"]
        if "peak_mem_gb" in panda:
            ratios[f"{kind}_memory_panda_over_hf"] = panda["peak_mem_gb"] / base["peak_mem_gb"]
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from panda.train.metrics import device_name

    args = parse_args(argv)
    device = pick_device(args.tiny)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    runs = []
    with tempfile.TemporaryDirectory(prefix="panda-lora-bench-") as tmp:
        folder = Path(tmp)
        vocab = save_checkpoint(args.preset, folder, device, dtype)
        batches = random_batches(args.warmup + args.steps, args.micro_batch, args.seq, vocab)
        for name, make_step, quant in variants(device, args.no_qlora, args.rounds):
            runs.append(measure(name, make_step, folder, batches, args, device, quant))
            print(format_result(runs[-1]), flush=True)
    results = mean_by_variant(runs)
    ratios = ratios_of(results)
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    record = {"benchmark": "lora_throughput",
              "date": utc_now(), "device": device_name(device),
              "versions": versions("peft", "bitsandbytes"),
              "settings": {"preset": args.preset, "seq": args.seq,
                           "micro_batch": args.micro_batch, "lora_r": args.lora_r,
                           "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.05,
                           "target_modules": "all-linear", "gradient_checkpointing": True,
                           "quant": "nf4, double quant, bf16 compute",
                           "precision": "bf16" if device != "cpu" else "fp32",
                           "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                           "tiny": args.tiny},
              "results": results, "ratios": ratios}
    append_record(record, args.results, args.tiny)
    return record


def format_result(result: dict[str, Any]) -> str:
    line = f"{result['variant']:>14}: {result['tokens_per_s']:>9,.0f} tok/s"
    if "peak_mem_gb" in result:
        line += f" | peak {result['peak_mem_gb']:.1f} GiB"
    return (line + f" | {result['step_s'] * 1000:.0f} ms/step | load {result['load_s']:.1f} s"
            f" | loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}"
            f" | {result['trainable_parameters'] / 1e6:.1f} M trainable")


if __name__ == "__main__":
    main()
