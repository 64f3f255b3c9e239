"""The docs stay true: the recipe reference is current, links resolve, recipes validate."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from panda.recipe import load

REFERENCE = ROOT / "docs" / "recipe-reference.md"
GENERATOR = ROOT / "docs" / "gen_recipe_reference.py"
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def test_recipe_reference_matches_the_schema_and_plugins():
    result = subprocess.run([sys.executable, str(GENERATOR), "--stdout"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    if result.stdout != committed:
        diff = difflib.unified_diff(committed.splitlines(), result.stdout.splitlines(),
                                    "docs/recipe-reference.md (committed)", "generated",
                                    lineterm="", n=1)
        shown = "\n".join(list(diff)[:40])
        pytest.fail("docs/recipe-reference.md is out of date with the recipe schema or the "
                    "built-in plugins; regenerate it with `python docs/gen_recipe_reference.py` "
                    f"and commit it.\n{shown}", pytrace=False)


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")) + [
    ROOT / "examples" / "panda-plugin-example" / "README.md"], ids=lambda p: p.name)
def test_relative_links_point_at_files(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8"))
    missing = [link for link in links if "://" not in link
               and not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name data paths relative to the repository
    load(recipe)
