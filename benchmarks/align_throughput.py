"""DPO throughput with LoRA: panda's dpo method against TRL's DPOTrainer, same settings.

Both train the same randomly initialised Llama-3-8B-shaped model (preset
``llama3-8b``, bf16 weights, SDPA, activation checkpointing) with the same
LoRA (r 16, alpha 32, every linear layer of the blocks, no dropout), DPO sigmoid
loss with beta 0.1, the reference being the base with the adapter switched off,
on the same pairs: each row is a prompt of seq/2 tokens and a reply of seq/2
tokens (2 pairs per step, 4 sequences of ``--seq`` tokens). TRL runs its own
``DPOTrainer.train()`` (data pipeline, collator, fused LM head, Trainer loop);
panda runs its real step (``backend.train_step`` of the single backend with the
``dpo`` method) on batches built from the token ids TRL's pipeline produced.
Each reports tokens/s (real tokens of both replies' rows, timed after warm-up
steps with the device synchronised) and peak memory; then panda / TRL.

    python benchmarks/align_throughput.py          # a GPU host with trl installed
    python benchmarks/align_throughput.py --tiny   # any CPU: proves the harness runs

Each GPU run appends one JSON line to benchmarks/results.jsonl (``--results PATH``
elsewhere; --tiny writes nowhere unless --results is given).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, RESULTS, append_record, peak_memory_gb,  # noqa: E402
                          panda_single_step, pick_device, reset_memory, synchronize,
                          timed_steps, utc_now, versions)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(preset: str, device: str, dtype: Any, checkpointing: bool) -> Any:
    """The preset's shape, randomly initialised (seed 0), SDPA, in ``dtype`` on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.loading import enable_activation_checkpointing
    from panda.models.presets import PRESETS

    fields = dict(PRESETS[preset])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.use_cache = False
    config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model


def synthetic_pairs(tokenizer: Any, count: int, seq: int, seed: int = 0) -> list[dict[str, str]]:
    """Text pairs: a prompt of just under seq/2 tokens, replies longer than the rest of the
    row, so TRL's max_length cuts every row to ``seq`` tokens (prompt + reply)."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(400)]
    sample = " ".join(rng.choice(vocabulary) for _ in range(200))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 200

    def text(tokens: float) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(max(1, int(tokens / per_word))))

    return [{"prompt": text(0.45 * seq), "chosen": " " + text(0.75 * seq),
             "rejected": " " + text(0.75 * seq)} for _ in range(count)]


# -- TRL --------------------------------------------------------------------------------------

def run_trl(args: argparse.Namespace, device: str, tokenizer: Any, pairs: list) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    reset_memory(device)
    on_gpu = device.startswith("cuda")
    model = build_model(args.preset, device, torch.bfloat16 if on_gpu else torch.float32,
                        checkpointing=False)  # TRL turns it on from its config
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_, **__):
            synchronize(device)
            step_times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs,
            gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
            learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, bf16=on_gpu, use_cpu=not on_gpu, beta=0.1,
            max_length=args.seq, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            report_to="none", save_strategy="no", logging_steps=10**6,
            dataloader_num_workers=0, seed=0, disable_tqdm=True)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                          target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(pairs), peft_config=lora,
                             callbacks=[StepTimer()])
        processed = trainer.train_dataset
        synchronize(device)
        started = time.perf_counter()
        mean_loss = trainer.train().training_loss
    timed = step_times[-1] - step_times[args.warmup - 1] if args.warmup else \
        step_times[-1] - started
    tokens = tokens_per_step(processed, args) * args.steps
    result = {"variant": "trl", "tokens_per_s": tokens / timed, "step_s": timed / args.steps,
              "peak_mem_gb": peak_memory_gb(device), "mean_loss": mean_loss}
    token_ids = [{key: list(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
                 for row in processed]
    del trainer, model
    return result, token_ids


def tokens_per_step(processed: Any, args: argparse.Namespace) -> int:
    """Real tokens of one step's rows (each row cut to --seq, as both sides train on)."""
    row = processed[0]
    prompt = len(row["prompt_ids"])
    per_pair = sum(min(args.seq, prompt + len(row[side])) for side in ("chosen_ids",
                                                                       "rejected_ids"))
    return per_pair * args.pairs


# -- panda ------------------------------------------------------------------------------------

def pair_batches(token_ids: list[dict], args: argparse.Namespace) -> list[dict]:
    """panda's pair batch contract from TRL's token ids (cut to --seq like TRL's rows)."""
    import torch

    batches = []
    for start in range(0, len(token_ids) - args.pairs + 1, args.pairs):
        rows = token_ids[start:start + args.pairs]
        batch: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            sequences = [(r["prompt_ids"] + r[f"{side}_ids"])[:args.seq] for r in rows]
            width = max(len(s) for s in sequences)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for index, (row, sequence) in enumerate(zip(rows, sequences)):
                ids[index, :len(sequence)] = torch.tensor(sequence)
                prompt = len(row["prompt_ids"])
                labels[index, prompt:len(sequence)] = torch.tensor(sequence[prompt:])
            batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
        batch["_num_pairs"] = torch.tensor(len(rows))
        batches.append(batch)
    return batches


def run_panda(args: argparse.Namespace, device: str, token_ids: list[dict]) -> dict:
    import torch

    from panda import recipe as recipe_io
    from panda import registry
    from panda.adapters import apply_lora

    reset_memory(device)
    on_gpu = device.startswith("cuda")
    recipe = recipe_io.validate({
        "model": {"preset": args.preset, "dtype": "bfloat16" if on_gpu else "float32"},
        "data": {"sources": [{"name": "preference", "path": "synthetic"}]},
        "method": {"name": "dpo", "beta": 0.1},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0,
                 "target_modules": TARGETS},
        "optim": {"name": "adamw", "lr": 5e-5, "max_grad_norm": 1.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"precision": "bf16" if on_gpu else "fp32",
                  "gradient_accumulation_steps": 1},
        "backend": {"name": "single"}})
    model = build_model(args.preset, device, torch.bfloat16 if on_gpu else torch.float32,
                        checkpointing=True)
    model = apply_lora(model, recipe.lora)
    method = registry.get("method", "dpo")(recipe.method.options)
    model = method.prepare(model, SimpleNamespace(recipe=recipe))
    step = panda_single_step(recipe, model, method, device)
    batches = pair_batches(token_ids, args)[:args.warmup + args.steps]
    losses, _, elapsed = timed_steps(step, batches, args.warmup, device)
    tokens = sum(int((b[f"{s}_input_ids"] != 0).sum()) for b in batches[args.warmup:]
                 for s in ("chosen", "rejected"))
    result = {"variant": "panda", "tokens_per_s": tokens / elapsed,
              "step_s": elapsed / args.steps, "peak_mem_gb": peak_memory_gb(device),
              "mean_loss": sum(float(loss) for loss in losses) / len(losses)}
    del step, model
    return result


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-llama, short rows, CPU if "
                        "there is no GPU: checks the harness, measures nothing useful")
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (prompt + reply)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"append the JSON line here (default: {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.seq, args.pairs = "tiny-llama", 64, 2
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import importlib.util

    from panda.models import tiny_tokenizer
    from panda.train.metrics import device_name

    args = parse_args(argv)
    device = pick_device(args.tiny)
    if importlib.util.find_spec("trl") is None:
        sys.exit("this benchmark compares against TRL: pip install trl")
    tokenizer = tiny_tokenizer.load()  # ids < 512: any vocabulary size takes them
    pairs = synthetic_pairs(tokenizer, args.pairs * (args.warmup + args.steps), args.seq)
    trl_result, token_ids = run_trl(args, device, tokenizer, pairs)
    print(format_result(trl_result), flush=True)
    panda_result = run_panda(args, device, token_ids)
    print(format_result(panda_result), flush=True)
    ratios = {"panda_over_trl_speed": panda_result["tokens_per_s"] / trl_result["tokens_per_s"]}
    if panda_result["peak_mem_gb"] and trl_result["peak_mem_gb"]:
        ratios["panda_over_trl_memory"] = panda_result["peak_mem_gb"] / trl_result["peak_mem_gb"]
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    record = {"benchmark": "align_throughput",
              "date": utc_now(), "device": device_name(device),
              "versions": versions("trl", "peft"),
              "settings": {"preset": args.preset, "seq": args.seq, "pairs": args.pairs,
                           "lora_r": args.lora_r, "steps": args.steps, "warmup": args.warmup,
                           "method": "dpo sigmoid, beta 0.1, reference = adapter off",
                           "precision": "bf16" if device != "cpu" else "fp32",
                           "checkpointing": True, "tiny": args.tiny},
              "results": [trl_result, panda_result], "ratios": ratios}
    append_record(record, args.results, args.tiny)
    return record


def format_result(result: dict[str, Any]) -> str:
    line = f"{result['variant']:>6}: {result['tokens_per_s']:>10,.0f} tok/s"
    if result.get("peak_mem_gb"):
        line += f" | peak {result['peak_mem_gb']:.1f} GiB"
    return line + f" | {result['step_s'] * 1000:.0f} ms/step | mean loss {result['mean_loss']:.4f}"


if __name__ == "__main__":
    main()
