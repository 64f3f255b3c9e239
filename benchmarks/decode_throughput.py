"""Decode throughput: panda's fast decoding next to a plain ``model.generate`` (issue 8).

A randomly initialised model of a preset shape (default llama3.2-1b, bf16) generates
--new-tokens tokens (EOS ignored, greedy) for --batch-sizes prompts of --prompt-len
random tokens, timed per variant, in one process and on the same weights:

* generate:        ``model.generate`` with its default (dynamic) cache
* generate-static: ``model.generate(cache_implementation="static")`` (transformers
                   compiles its decode step itself); skip with --no-hf-static
* panda:           ``panda.infer.decode`` with a static cache and a compiled decode step
                   (CUDA graphs), what ``panda infer`` uses on one GPU

Each variant is warmed up once (compilation, CUDA graph capture) and then timed
--repeat times; the fastest run counts. tokens/s = batch * new tokens / seconds
(prefill included). On CUDA the weight-streaming roofline is also given: every
decode step reads all weights once, so batch-1 tokens/s cannot exceed
measured copy bandwidth / weight bytes. One JSON line per batch size is appended
to benchmarks/results.jsonl.

    python benchmarks/decode_throughput.py                # GPU: llama3.2-1b, batch 1 and 16
    python benchmarks/decode_throughput.py --tiny         # any machine: tiny-llama, short run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"


def build_model(preset: str, dtype_name: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from panda.models.presets import PRESETS

    fields = dict(PRESETS[preset])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name),
                                                 attn_implementation="sdpa")
    return model.eval()


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), the decode roofline's input."""
    import torch

    if device != "cuda":
        return None
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    runs = 10
    for _ in range(runs):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * runs / (time.perf_counter() - start)


def run_generate(model, input_ids, new_tokens: int, static: bool):
    import torch

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(input_ids), pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        output = model.generate(input_ids, **kwargs)
    return output[:, input_ids.shape[1]:].tolist()


def run_panda(model, prompts, new_tokens: int, static):
    from panda.infer.decode import decode
    from panda.infer.sampling import Sampling

    sampling = Sampling(temperature=0, max_new_tokens=new_tokens, stop_at_eos=False)
    out = [[] for _ in prompts]
    for tokens in decode(model, prompts, sampling, pad_token_id=0, eos_token_ids=set(),
                         static=static):
        for row, token in enumerate(tokens):
            out[row].append(token)
    return out


def timed(function, repeat: int, device: str) -> tuple[float, object]:
    function()  # warm-up: compilation and CUDA graph capture are not decode speed
    best, result = float("inf"), None
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def same_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens that agree before the first difference, summed over rows (bf16 kernels differ)."""
    total = 0
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            if x != y:
                break
            total += 1
    return total


def versions() -> dict[str, str]:
    import torch
    import transformers

    from importlib import metadata

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "panda": metadata.version("pandallm") if _installed("pandallm") else "source"}


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-hf-static", action="store_true",
                        help="skip generate(cache_implementation='static')")
    parser.add_argument("--no-compile", action="store_true",
                        help="panda: static cache without torch.compile")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--fullgraph", action="store_true",
                        help="panda: compile the decode step as one graph (no graph breaks)")
    parser.add_argument("--only-panda", action="store_true",
                        help="skip the generate baselines (no ratios): to try panda's options")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny-llama, fp32, 32 new tokens: proves the script on a CPU")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    import torch

    from panda.infer.decode import StaticDecoding
    from panda.models.presets import PRESETS, parameter_count

    if args.tiny:
        args.preset, args.dtype, args.new_tokens, args.repeat = "tiny-llama", "float32", 32, 1
        args.batch_sizes = "1,4"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.preset, args.dtype, device)
    # On a CPU inductor needs a C++ toolchain and minutes; the static cache alone shows the path.
    compile_step = not args.no_compile and device == "cuda"
    static = StaticDecoding(model, compile=compile_step, mode=args.compile_mode,
                            fullgraph=args.fullgraph)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    generator = torch.Generator().manual_seed(0)

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompt_tensor = torch.randint(3, PRESETS[args.preset]["vocab_size"],
                                      (batch, args.prompt_len), generator=generator)
        prompts = prompt_tensor.tolist()
        input_ids = prompt_tensor.to(device)
        seconds, outputs = {}, {}
        if not args.only_panda:
            seconds["generate"], outputs["generate"] = timed(
                lambda: run_generate(model, input_ids, args.new_tokens, static=False),
                args.repeat, device)
        if not (args.no_hf_static or args.only_panda):
            seconds["generate-static"], outputs["generate-static"] = timed(
                lambda: run_generate(model, input_ids, args.new_tokens, static=True),
                args.repeat, device)
        seconds["panda"], outputs["panda"] = timed(
            lambda: run_panda(model, prompts, args.new_tokens, static), args.repeat, device)
        tokens = batch * args.new_tokens
        rates = {name: round(tokens / s, 1) for name, s in seconds.items()}
        record = {
            "benchmark": "decode_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name, "versions": versions(), "preset": args.preset,
            "parameters": parameter_count(PRESETS[args.preset]), "dtype": args.dtype,
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "panda_decode": {"static_cache": True, "compiled": compile_step,
                             "compile_mode": args.compile_mode if compile_step else None,
                             "fullgraph": args.fullgraph},
            "tokens_per_s": rates,
        }
        if "generate" in rates:
            record["ratio_vs_generate"] = {name: round(rate / rates["generate"], 2)
                                           for name, rate in rates.items() if name != "generate"}
            record["greedy_tokens_agreeing_with_generate"] = {
                name: f"{same_prefix(out, outputs['generate'])}/{tokens}"
                for name, out in outputs.items() if name != "generate"}
        if bandwidth:
            roofline = bandwidth / weight_bytes * batch  # each step streams every weight once
            record["roofline"] = {"copy_bandwidth_gb_s": round(bandwidth / 1e9),
                                  "weight_gb": round(weight_bytes / 1e9, 2),
                                  "tokens_per_s": round(roofline, 1),
                                  "panda_fraction": round(rates["panda"] / roofline, 3)}
        print(json.dumps(record), flush=True)
        with open(args.results, "a", encoding="utf-8") as results:
            results.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
