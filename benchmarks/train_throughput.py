"""Training throughput: panda's engine against a plain Hugging Face loop, same settings.

Both train the same randomly initialised Llama-3.2-1B-shaped model (preset
``llama3.2-1b``, SDPA attention, fp32 master weights, bf16 autocast, fused
AdamW, clipping at 1.0) on the same random token batches, one after the other
in one process. panda runs its real step (``backend.train_step``: the ``sft``
method's loss, DESIGN section 6 normalisation, clipping, optimizer and
schedule); the baseline is the loop people write by hand (``model(...,
labels=...)``, ``loss.backward()``, clip, ``optimizer.step()``). Each variant
is measured after warm-up steps with the device synchronised, and reports
tokens/s, MFU (6N + attention FLOPs against the device's bf16 dense peak) and
peak memory; then the panda/baseline ratio, with and without torch.compile.

    python benchmarks/train_throughput.py                  # a GPU host (H100: ~3 minutes)
    python benchmarks/train_throughput.py --tiny           # any CPU: proves the harness runs

Each run appends one JSON line (device, versions, settings, figures) to
benchmarks/results.jsonl (``--results PATH`` elsewhere; --tiny writes nowhere
unless --results is given).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, RESULTS, append_record, pick_device,  # noqa: E402
                          panda_single_step, peak_memory_gb, reset_memory, timed_steps,
                          utc_now, versions)


def build_model(preset: str, device: str, seed: int = 0):
    """The preset's shape, randomly initialised with ``seed``, fp32 weights, SDPA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.presets import PRESETS

    fields = dict(PRESETS[preset])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                             dtype=torch.float32)
    return model.to(device)


def random_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        yield {"input_ids": ids, "labels": ids.clone(),
               "position_ids": torch.arange(seq).expand(batch, seq).clone()}


# -- the two training steps -----------------------------------------------------------------

def plain_hf_step(model, device: str, compile: bool) -> Callable[[dict], float]:
    import torch

    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.startswith("cuda"))

    def step(batch: dict) -> float:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def panda_step(model, device: str, compile: bool) -> Callable[[dict], float]:
    """panda's engine: a Job with the single backend, the sft method and the adamw plugin."""
    from panda import recipe as recipe_io
    from panda import registry

    recipe = recipe_io.validate({
        "model": {"preset": "llama3.2-1b", "dtype": "float32"},
        "data": {"sources": [{"name": "pretrain", "path": "synthetic"}], "packing": False},
        "method": {"name": "pretrain"}, "optim": {"name": "adamw", "lr": 1e-5,
                                                  "max_grad_norm": 1.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"precision": "bf16", "compile": compile, "gradient_accumulation_steps": 1},
        "backend": {"name": "single"}})
    method = registry.get("method", "pretrain")(recipe.method.options)
    return panda_single_step(recipe, model, method, device)


# -- measuring ----------------------------------------------------------------------------

def measure(name: str, make_step: Callable, args: argparse.Namespace, device: str,
            peak: float | None) -> dict[str, Any]:
    from panda.train.metrics import flops_per_token

    reset_memory(device)
    model = build_model(args.preset, device)
    per_token = flops_per_token(model, args.seq)
    step = make_step(model, device, args.compile_variant)
    vocab = model.config.vocab_size
    batches = list(random_batches(args.warmup + args.steps, args.micro_batch, args.seq, vocab))
    # warm-up includes compilation for compiled variants
    losses, warmup_s, elapsed = timed_steps(step, batches, args.warmup, device)
    tokens = args.steps * args.micro_batch * args.seq
    result = {"variant": name, "tokens_per_s": tokens / elapsed,
              "step_s": elapsed / args.steps, "warmup_s": warmup_s,
              "last_loss": float(losses[-1])}
    if peak:
        result["mfu"] = tokens * per_token / elapsed / (peak * 1e12)
    if device.startswith("cuda"):
        result["peak_mem_gb"] = peak_memory_gb(device)
    del model, step, batches
    gc.collect()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-llama, short sequences, "
                        "CPU if there is no GPU: checks the harness, measures nothing useful")
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: panda's device table)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"append the JSON line here (default: {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.seq, args.micro_batch = "tiny-llama", 128, 2
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.no_compile = True if "--no-compile" not in (argv or sys.argv) else args.no_compile
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from panda.train.metrics import device_name, peak_tflops

    args = parse_args(argv)
    device = pick_device(args.tiny)
    name = device_name(device)
    peak = peak_tflops(name, "bf16", args.peak_tflops)
    variants = [("hf", plain_hf_step, False), ("panda", panda_step, False)]
    if not args.no_compile:
        variants += [("hf+compile", plain_hf_step, True), ("panda+compile", panda_step, True)]
    results = []
    for label, make_step, compiled in variants:
        args.compile_variant = compiled
        results.append(measure(label, make_step, args, device, peak))
        print(format_result(results[-1]), flush=True)
    by_name = {r["variant"]: r for r in results}
    ratios = {"panda_over_hf": by_name["panda"]["tokens_per_s"] / by_name["hf"]["tokens_per_s"]}
    if "panda+compile" in by_name:
        ratios["panda_compile_over_hf_compile"] = (by_name["panda+compile"]["tokens_per_s"] /
                                                   by_name["hf+compile"]["tokens_per_s"])
        ratios["panda_compile_over_panda"] = (by_name["panda+compile"]["tokens_per_s"] /
                                              by_name["panda"]["tokens_per_s"])
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    record = {"benchmark": "train_throughput",
              "date": utc_now(), "device": name, "peak_tflops": peak, "versions": versions(),
              "settings": {"preset": args.preset, "seq": args.seq,
                           "micro_batch": args.micro_batch, "steps": args.steps,
                           "warmup": args.warmup, "precision": "bf16 autocast, fp32 master",
                           "optimizer": "AdamW (fused on CUDA)", "attention": "sdpa",
                           "max_grad_norm": 1.0, "tiny": args.tiny},
              "results": results, "ratios": ratios}
    append_record(record, args.results, args.tiny)
    return record


def format_result(result: dict[str, Any]) -> str:
    line = f"{result['variant']:>14}: {result['tokens_per_s']:>10,.0f} tok/s"
    if "mfu" in result:
        line += f" | MFU {result['mfu']:.1%}"
    if "peak_mem_gb" in result:
        line += f" | peak {result['peak_mem_gb']:.1f} GiB"
    return line + f" | loss {result['last_loss']:.3f} | warm-up {result['warmup_s']:.1f} s"


if __name__ == "__main__":
    main()
