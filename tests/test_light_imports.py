"""`import panda` and the everyday commands never import the heavy libraries (DESIGN §3).

Each case runs in a fresh interpreter: a small wrapper runs the CLI through
``panda.cli.main`` (catching its SystemExit), then writes ``sorted(sys.modules)``
as JSON to a file, which the test inspects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "deepspeed", "peft")

WRAPPER = textwrap.dedent("""\
    import json, sys
    out, args = sys.argv[1], sys.argv[2:]
    import panda
    exit_code = None
    if args != ["--import-only"]:
        from panda.cli import main
        sys.argv = ["panda", *args]
        try:
            main()
        except SystemExit as exc:
            exit_code = exc.code
    with open(out, "w") as f:
        json.dump({"modules": sorted(sys.modules), "exit_code": exit_code}, f)
""")


def modules_after(tmp_path: Path, *args: str) -> tuple[list[str], object]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if k != "PANDA_DEBUG"}
    result = subprocess.run([sys.executable, "-c", WRAPPER, str(out), *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    return report["modules"], report["exit_code"]


def heavy_in(modules: list[str]) -> list[str]:
    return [name for name in modules if name.split(".")[0] in HEAVY]


# Each case also names modules it must have loaded: proof that the list was taken
# after the command really ran.
@pytest.mark.parametrize("args, loaded", [
    (("--import-only",), "panda"),
    (("--help",), "panda.cli"),
    (("plugins",), "panda.cli.plugins_cmd"),
    (("recipe", "validate", "recipes/demo.toml"), "panda.plugins.models.hf"),
], ids=["import panda", "panda --help", "panda plugins", "panda recipe validate"])
def test_no_heavy_imports(tmp_path, args, loaded):
    modules, exit_code = modules_after(tmp_path, *args)
    assert exit_code in (None, 0), f"panda {' '.join(args)} exited {exit_code}"
    assert loaded in modules
    assert heavy_in(modules) == []
