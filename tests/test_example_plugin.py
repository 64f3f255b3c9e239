"""The third-party round trip: pip-install examples/panda-plugin-example, then use it.

The package is installed with pip into a temporary folder (``--target``) and
that folder is put on PYTHONPATH of the CLI subprocesses. Its dist-info, with
entry_points.txt, is then on sys.path, which is exactly what
``importlib.metadata`` scans: the same discovery path as a real site-packages
install, without touching the test environment. Building is offline
(``--no-index --no-build-isolation`` uses the setuptools already installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = ROOT / "examples" / "panda-plugin-example"
PACKAGE = "panda-plugin-example"
PLUGINS = {"model": "example-tiny", "dataset": "qa-pairs", "optimizer": "sgd-momentum"}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A folder holding the installed example package, for PYTHONPATH."""
    if not can_build_wheels_offline():
        pytest.fail("building the example plugin offline needs setuptools>=70.1 (or setuptools "
                    "with the wheel package) in this environment: pip install 'setuptools>=70.1'")
    work = tmp_path_factory.mktemp("example-plugin")
    # Build from a copy: pip builds in the source tree and would leave build/ and
    # *.egg-info behind in the repository.
    source = shutil.copytree(EXAMPLE, work / "src")
    target = work / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(source)],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(target)


def can_build_wheels_offline() -> bool:
    """Whether --no-build-isolation can build a wheel here: setuptools has bdist_wheel
    built in from 70.1; older versions need the separate wheel package."""
    try:
        version = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except metadata.PackageNotFoundError:
        return False
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture
def with_plugin(plugin_path):
    """Environment for a subprocess that sees the installed example package."""
    existing = os.environ.get("PYTHONPATH")
    path = plugin_path + (os.pathsep + existing if existing else "")
    return {"PYTHONPATH": path, "COLUMNS": "200"}  # wide: rich tables do not wrap


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def write_recipe(folder: Path, body: str) -> Path:
    data = folder / "qa.jsonl"
    data.write_text('{"q": "2+2?", "a": "4"}\n', encoding="utf-8")
    recipe = folder / "recipe.toml"
    recipe.write_text(textwrap.dedent(body).replace("QA_PATH", data.as_posix()), encoding="utf-8")
    return recipe


PLUGIN_RECIPE = """\
    [model]
    name = "example-tiny"
    preset = "example-tiny-4l"

    [[data.sources]]
    name = "qa-pairs"
    path = "QA_PATH"
    prompt_prefix = "Q: "

    [optim]
    name = "sgd-momentum"
    lr = 0.1
    momentum = 0.5
    """


def test_importlib_metadata_sees_the_target_install(with_plugin):
    result = run_python("""
        from importlib import metadata
        dist = metadata.distribution("panda-plugin-example")
        for ep in sorted(dist.entry_points, key=lambda ep: ep.group):
            print(ep.group, ep.name, ep.value)
        """, with_plugin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "panda.datasets qa-pairs panda_plugin_example.dataset:QaPairs",
        "panda.models example-tiny panda_plugin_example.model:ExampleTiny",
        "panda.optimizers sgd-momentum panda_plugin_example.optimizer:SgdMomentum",
    ]


def test_plugins_lists_its_names_with_its_package(run_panda, with_plugin):
    listed = run_panda("plugins", env=with_plugin)
    assert listed.returncode == 0, listed.stderr
    for kind, name in PLUGINS.items():
        section = listed.stdout.split(f"{kind} (")[1].split("\n\n")[0]
        assert re.search(rf"^  {name}\s+{PACKAGE} 0\.1\.0$", section, re.M), listed.stdout
    # Without the install the names are gone: the test sees the package, not a leftover.
    bare = run_panda("plugins")
    assert not any(name in bare.stdout for name in PLUGINS.values())


def test_listing_does_not_import_the_package_but_use_does(with_plugin):
    result = run_python("""
        import sys
        from panda import registry
        from panda.recipe import load
        registry.names("optimizer")
        print("listed", any(m.startswith("panda_plugin_example") for m in sys.modules))
        load("examples/panda-plugin-example/recipe.toml")
        print("validated", sorted(m for m in sys.modules if m.startswith("panda_plugin_example.")))
        # its modules keep heavy imports inside build(): validating stays light
        print("heavy", sorted({"torch", "transformers", "tokenizers"} & set(sys.modules)))
        """, with_plugin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "listed False",
        "validated ['panda_plugin_example.dataset', 'panda_plugin_example.model', "
        "'panda_plugin_example.optimizer']",
        "heavy []",
    ]


def test_plugins_show_prints_its_options(run_panda, with_plugin):
    shown = run_panda("plugins", "show", "sgd-momentum", env=with_plugin)
    assert shown.returncode == 0, shown.stderr
    assert f"optimizer 'sgd-momentum' from {PACKAGE}" in shown.stdout
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:5]]
            for line in shown.stdout.splitlines() if line.startswith("│")}
    assert rows == {
        "momentum": ["float", "0.9", "Momentum factor."],
        "nesterov": ["bool", "False", "Use Nesterov momentum (needs momentum > 0)."],
    }


def test_plugins_show_lists_the_model_presets(run_panda, with_plugin):
    shown = run_panda("plugins", "show", "example-tiny", env=with_plugin)
    assert shown.returncode == 0, shown.stderr
    assert "example-tiny-2l" in shown.stdout and "example-tiny-4l" in shown.stdout
    assert "presets" in shown.stdout


def test_recipe_naming_its_plugins_validates(run_panda, with_plugin, tmp_path):
    recipe = write_recipe(tmp_path, PLUGIN_RECIPE)
    result = run_panda("recipe", "validate", str(recipe), env=with_plugin)
    assert result.returncode == 0, result.stderr
    assert "model example-tiny-4l" in result.stdout and "data qa-pairs" in result.stdout
    shown = run_panda("recipe", "show", str(recipe), env=with_plugin)
    assert 'prompt_prefix = "Q: "' in shown.stdout  # its own option, resolved
    assert "momentum = 0.5" in shown.stdout and "nesterov = false" in shown.stdout


def test_the_example_recipe_validates(run_panda, with_plugin):
    result = run_panda("recipe", "validate", "recipe.toml", cwd=EXAMPLE, env=with_plugin)
    assert result.returncode == 0, result.stderr


# (edits to PLUGIN_RECIPE, the line the error points at, the error after "file:line: ")
BAD_OPTIONS = [
    pytest.param({"momentum = 0.5": "momentum = 1.5"}, "momentum =",
                 "optim.momentum: Input should be less than 1 (got 1.5)", id="out-of-range"),
    pytest.param({"momentum = 0.5": "momentun = 0.5"}, "momentun =",
                 "optim.momentun: unknown key 'momentun' for optimizer 'sgd-momentum'; did you "
                 "mean 'momentum'? Allowed: name, lr, weight_decay, max_grad_norm, momentum, "
                 "nesterov", id="unknown-key"),
    # A check across two options has no single key: it points at the section.
    pytest.param({"momentum = 0.5": "momentum = 0.0\n    nesterov = true"}, "[optim]",
                 "optim: nesterov needs momentum > 0", id="cross-field"),
    pytest.param({'prompt_prefix = "Q: "': "max_answer_chars = 0"}, "max_answer_chars =",
                 "data.sources[0].max_answer_chars: Input should be greater than 0 (got 0)",
                 id="dataset-option"),
    pytest.param({"example-tiny-4l": "example-tiny-9l"}, "preset =",
                 "model.preset: Input should be 'example-tiny-2l' or 'example-tiny-4l' "
                 "(got 'example-tiny-9l')", id="model-option"),
    # A built-in plugin's bad option, for comparison: the same format.
    pytest.param({'"sgd-momentum"': '"adamw"', "momentum = 0.5": "eps = 0"}, "eps =",
                 "optim.eps: Input should be greater than 0 (got 0)", id="built-in-adamw"),
]


@pytest.mark.parametrize("edits, located_at, expected", BAD_OPTIONS)
def test_bad_plugin_option_is_one_located_error(run_panda, with_plugin, tmp_path,
                                                edits, located_at, expected):
    body = PLUGIN_RECIPE
    for old, new in edits.items():
        body = body.replace(old, new)
    recipe = write_recipe(tmp_path, body)
    line = line_starting_with(recipe, located_at)
    result = run_panda("recipe", "validate", str(recipe), env=with_plugin)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {recipe}:{line}: {expected}"]


def line_starting_with(file: Path, text: str) -> int:
    lines = file.read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(text))


def test_plugins_check_imports_them_ok(run_panda, with_plugin):
    checked = run_panda("plugins", "--check", env=with_plugin)
    for kind, name in PLUGINS.items():
        assert re.search(rf"^{kind}\s+{name}\s+{PACKAGE}\s+ok$", checked.stdout, re.M), \
            checked.stdout + checked.stderr


def test_its_plugins_work_when_used(with_plugin, tmp_path):
    """Build the tiny model, encode a Q/A record and take one SGD step, all from the package."""
    data = tmp_path / "qa.jsonl"
    data.write_text('{"q": "2+2?", "a": "4"}\n\n{"q": "x"}\n', encoding="utf-8")
    result = run_python(f"""
        import torch
        from panda import registry
        from panda.errors import DataError

        model_plugin = registry.get("model", "example-tiny")()
        model, tokenizer = model_plugin.build(None), model_plugin.tokenizer(None)
        dataset = registry.get("dataset", "qa-pairs")
        records = dataset().records({str(data)!r})
        where, record = next(records)
        example = dataset(dataset.Options(prompt_prefix="Q: ")).encode(record, tokenizer, None)
        prompt = len(tokenizer("Q: 2+2?\\nAnswer: ")["input_ids"])
        assert example["labels"][:prompt] == [-100] * prompt, example
        assert example["labels"][prompt:] == example["input_ids"][prompt:], example
        assert tokenizer.decode(example["input_ids"]) == "Q: 2+2?\\nAnswer: 4</s>"
        try:
            next(records)
        except DataError as exc:
            print("data error:", exc.message)

        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits
        print("logits", tuple(logits.shape))

        optimizer_plugin = registry.get("optimizer", "sgd-momentum")
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = optimizer_plugin(optimizer_plugin.Options(momentum=0.5)).build(
            [{{"params": [weight], "weight_decay": 0.0}}], lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            weight.sum().backward()
            optimizer.step()
        print("weight", round(weight[0].item(), 6))
        """, with_plugin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f'data error: {data}:3: "a" must be a string (keys: q)',
        f"logits (1, {len('Q: 2+2?') + len(chr(10) + 'Answer: 4') + 1}, 320)",
        # SGD with momentum 0.5, grad 1, lr 0.1: steps of 0.1 then 0.1 * 1.5
        "weight 0.75",
    ]
