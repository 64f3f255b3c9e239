"""Write the demo's synthetic instruction task: single-digit addition, checkable exactly.

    python recipes/data/make_demo_data.py      # rewrites demo_train.jsonl / demo_eval.jsonl

Every record is PandaLLM instruction data ``{"input": "7+5=", "target": "12"}``:
the input is masked out of the loss and the answer is trained. The training file
holds all 100 sums in a few phrasings, shuffled with a fixed seed; the eval file
holds each sum once in the plain phrasing the accuracy check asks. The output is
deterministic, so the committed files can be recreated byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHRASINGS = ("{a}+{b}=",)


def records(phrasings: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"input": phrasing.format(a=a, b=b), "target": str(a + b)}
            for a in range(10) for b in range(10) for phrasing in phrasings]


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    train = records(PHRASINGS)
    random.Random(0).shuffle(train)
    write(HERE / "demo_train.jsonl", train)
    write(HERE / "demo_eval.jsonl", records(PHRASINGS[:1]))


if __name__ == "__main__":
    main()
