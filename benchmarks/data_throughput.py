"""Throughput of `panda data prepare` next to a plain batched tokenizer call (issue 4).

Generates --mb megabytes of pre-training records ({"title", "content"} JSON lines,
long-tailed lengths, English and Chinese) and times, in one run and on the same texts:

* raw:     tokenizer(texts) in batches of 1000, the ids thrown away (no reading, no writing);
* prepare: panda.data.prepare with an empty cache: read, validate, tokenize, write the
           Arrow cache, pack;
* hit:     the same prepare again, served from the cache;
* datasets (unless --no-datasets): the usual Hugging Face way, Dataset.from_json + .map(
           batched tokenization), cold and from its own cache, for the cache choice.

Each measurement is repeated --repeat times, interleaved, and the fastest kept: on a
shared machine the others' load only ever adds time. Appends one JSON line to
benchmarks/results.jsonl. Goals (2-core reference machine): prepare within 1.5x of
raw; a cache hit under 2 s.

    .venv/bin/python benchmarks/data_throughput.py [--mb 50] [--repeat 2] [--max-seq-length 2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"


def generate(path: Path, megabytes: float, seed: int = 0) -> list[str]:
    """Write pre-training records; return the texts a tokenizer sees (title + newline + content)."""
    from panda.models.tiny_tokenizer import CORPUS

    rng = random.Random(seed)
    sentences = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = " ".join(sentences).split()
    texts, size = [], 0
    with path.open("w", encoding="utf-8") as out:
        while size < megabytes * 1e6:
            # lognormal paragraph counts: many short documents, a long tail of long ones
            paragraphs = []
            for _ in range(max(1, int(rng.lognormvariate(1.2, 1.0)))):
                paragraphs.append(" ".join(rng.choice(sentences) if rng.random() < 0.3 else
                                           " ".join(rng.choices(words, k=12))
                                           for _ in range(rng.randint(2, 8))))
            title = " ".join(rng.choices(words, k=rng.randint(2, 6)))
            content = "\n".join(paragraphs)
            line = json.dumps({"title": title, "content": content}, ensure_ascii=False)
            out.write(line + "\n")
            size += len(line.encode("utf-8")) + 1
            texts.append(f"{title}\n{content}")
    return texts


def time_raw(tokenizer, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for i in range(0, len(texts), 1000):
        count += sum(len(ids) for ids in tokenizer(texts[i:i + 1000])["input_ids"])
    return time.perf_counter() - start, count


def time_prepare(recipe, tokenizer) -> tuple[float, object]:
    import panda.data as data

    start = time.perf_counter()
    prepared = data.prepare(recipe, tokenizer)
    return time.perf_counter() - start, prepared


def time_datasets(path: Path, tokenizer, cache_dir: Path) -> tuple[float, float]:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    def tokenize(batch):
        texts = [f"{t}\n{c}" for t, c in zip(batch["title"], batch["content"])]
        return tokenizer(texts)

    times = []
    for _ in range(2):  # cold, then its own fingerprint cache
        start = time.perf_counter()
        ds = Dataset.from_json(str(path), cache_dir=str(cache_dir))
        ds.map(tokenize, batched=True, remove_columns=["title", "content"])
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="Megabytes of JSON lines.")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each measurement; the "
                        "fastest is kept.")
    parser.add_argument("--no-datasets", action="store_true", help="Skip the datasets.map run.")
    parser.add_argument("--no-record", action="store_true", help="Do not append to results.jsonl.")
    args = parser.parse_args()

    from panda.models.tiny_tokenizer import load
    from panda.recipe import validate

    work = Path(tempfile.mkdtemp(prefix="panda-bench-"))
    try:
        data_file = work / "pretrain.jsonl"
        texts = generate(data_file, args.mb)
        megabytes = data_file.stat().st_size / 1e6
        tokenizer = load()
        tokenizer("warm up")
        recipe = validate({"model": {"preset": "tiny-llama"}, "method": {"name": "pretrain"},
                           "data": {"max_seq_length": args.max_seq_length, "sources": [
                               {"name": "pretrain", "path": str(data_file)}]}})
        timings: dict[str, list[float]] = {}
        for run in range(args.repeat):
            raw_s, raw_tokens = time_raw(tokenizer, texts)
            os.environ["PANDA_CACHE"] = str(work / f"cache-{run}")  # cold every run
            cold_s, prepared = time_prepare(recipe, tokenizer)
            hit_s, again = time_prepare(recipe, tokenizer)
            assert again.sources[0].from_cache and not prepared.sources[0].from_cache
            runs = {"raw": raw_s, "cold": cold_s, "hit": hit_s}
            if not args.no_datasets:
                runs["ds_cold"], runs["ds_hit"] = time_datasets(data_file, tokenizer,
                                                                work / f"hf-cache-{run}")
            for key, value in runs.items():
                timings.setdefault(key, []).append(value)
            print(f"run {run}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs.items()),
                  flush=True)
        best = {key: min(values) for key, values in timings.items()}
        source = prepared.sources[0]
        result = {
            "benchmark": "data_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
            "python": platform.python_version(), "tokenizer": "panda tiny byte-level BPE (512)",
            "megabytes": round(megabytes, 1), "documents": source.stats.documents,
            "tokens": source.tokens, "raw_tokens": raw_tokens, "repeat": args.repeat,
            "raw_tokenizer_s": round(best["raw"], 2), "prepare_cold_s": round(best["cold"], 2),
            "prepare_cold_tokens_per_s": round(source.tokens / best["cold"]),
            "prepare_over_raw": round(best["cold"] / best["raw"], 3),
            "cache_hit_s": round(best["hit"], 3),
            "packing_efficiency": round(source.efficiency, 4),
            "padding_efficiency": round(source.padded_efficiency, 4),
        }
        if not args.no_datasets:
            result.update(datasets_map_cold_s=round(best["ds_cold"], 2),
                          datasets_map_hit_s=round(best["ds_hit"], 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for key, value in result.items():
        if key not in ("benchmark", "machine"):
            print(f"{key:28} {value}")
    ok = result["prepare_over_raw"] <= 1.5 and result["cache_hit_s"] < 2
    print(f"goals (prepare <= 1.5x raw, hit < 2 s): {'met' if ok else 'MISSED'}")
    if not args.no_record:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
