"""Accuracy of the demo task: greedy answers to every single-digit sum, checked exactly.

    python recipes/demo_accuracy.py --recipe recipes/demo.toml   # the untrained model
    python recipes/demo_accuracy.py --model runs/demo/final      # a trained one

Prints ``accuracy N/100 = P%`` and a few sample answers; ``--json`` prints the
numbers as JSON instead (the demo test reads it); ``--prompt TEXT`` (repeatable)
only generates answers to those prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_FILE = HERE / "data" / "demo_eval.jsonl"


def load_untrained(recipe_path: str):
    """The recipe's model before any training (same seed, same random init)."""
    from panda import recipe as recipe_io, registry

    recipe = recipe_io.load(recipe_path)
    plugin = registry.get("model", recipe.model.name)(recipe.model.options)
    return plugin.build(recipe), plugin.tokenizer(recipe)


def load_trained(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy continuation of the prompt, cut at </s>.

    The prompt is tokenized as training saw it: with the tokenizer's own special
    tokens (a BOS only if the tokenizer adds one).
    """
    import torch

    answers = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def accuracy(model, tokenizer) -> tuple[int, int, list[tuple[str, str, str]]]:
    rows = [json.loads(line) for line in EVAL_FILE.read_text(encoding="utf-8").splitlines()]
    got = answer(model, tokenizer, [row["input"] for row in rows])
    right = sum(g.strip() == row["target"] for g, row in zip(got, rows))
    samples = [(row["input"], row["target"], g) for row, g in zip(rows, got)]
    return right, len(rows), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", help="evaluate the recipe's untrained model")
    which.add_argument("--model", help="evaluate a trained Hugging Face folder")
    parser.add_argument("--label", default="", help="text printed before the result")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--prompt", action="append", help="only answer this prompt")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_trained(args.model) if args.model else load_untrained(args.recipe)
    if args.prompt:
        for prompt, got in zip(args.prompt, answer(model, tokenizer, args.prompt)):
            print(f"{args.label}{prompt}{got}")
        return
    right, total, samples = accuracy(model, tokenizer)
    if args.json:
        print(json.dumps({"right": right, "total": total, "accuracy": right / total}))
        return
    print(f"{args.label}accuracy {right}/{total} = {right / total:.0%}")
    for prompt, target, got in samples[:5]:
        print(f"  {prompt}{got!r:8} (expected {target})")


if __name__ == "__main__":
    main()
