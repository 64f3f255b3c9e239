"""The registry (DESIGN §3): lazy entry points, and errors that say which case happened.

In-process tests use a fresh Registry that reads real dist-info folders written
into a temporary "site" folder (``metadata.distributions`` is pointed there).
The CLI tests put such a folder on PYTHONPATH of a real ``panda`` subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

import panda.registry as registry_module
from panda.errors import MissingDependencyError, PluginError, require
from panda.registry import Registry

GOOD_PLUGIN = '''
from panda.plugins.api import OptimizerPlugin

class Good(OptimizerPlugin):
    """A plugin that imports fine."""
'''


def make_dist(site: Path, package: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str] | None = None) -> None:
    """Write an installed-looking distribution: dist-info with entry_points.txt, plus modules."""
    dist_info = site / f"{package.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n", encoding="utf-8")
    lines = []
    for group, names in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in names.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path whose distributions are the only ones a Registry sees."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    only_here = SimpleNamespace(distributions=lambda: metadata.distributions(path=[str(folder)]))
    monkeypatch.setattr(registry_module, "metadata", only_here)
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:  # forget the plugin modules this test imported
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(folder)):
            del sys.modules[name]


def optimizers(**names: str) -> dict[str, dict[str, str]]:
    return {"panda.optimizers": names}


# -- lazy loading -----------------------------------------------------------------------------

def test_names_are_listed_without_importing_and_imported_on_first_use(site):
    make_dist(site, "pkg-lazy", optimizers(lazy="lazy_plugin:Good"), {"lazy_plugin": GOOD_PLUGIN})
    registry = Registry()
    assert registry.names("optimizer") == ["lazy"]
    entry = registry.entry("optimizer", "lazy")
    assert (entry.package, entry.version, entry.target) == ("pkg-lazy", "0.1", "lazy_plugin:Good")
    assert "lazy_plugin" not in sys.modules

    plugin = registry.get("optimizer", "lazy")
    assert "lazy_plugin" in sys.modules
    assert plugin.__name__ == "Good" and plugin.summary() == "A plugin that imports fine."
    assert registry.get("optimizer", "lazy") is plugin  # loaded once


def test_listing_builtin_plugins_imports_none_of_them():
    code = ("import sys; from panda import registry\n"
            "names = {k: registry.names(k) for k in registry.KINDS}\n"
            "assert 'adamw' in names['optimizer'] and 'hf' in names['model'], names\n"
            "print(sorted(m for m in sys.modules if m.startswith('panda.plugins.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- unknown names ----------------------------------------------------------------------------

def test_unknown_name_says_kind_name_close_matches_and_installed(site):
    make_dist(site, "pkg-opts", optimizers(adamw="m:A", adafactor="m:B", lion="m:C"))
    with pytest.raises(PluginError) as caught:
        Registry().get("optimizer", "adamv")
    assert caught.value.message == ("unknown optimizer 'adamv'; did you mean 'adamw'? "
                                    "Installed: adafactor, adamw, lion")


def test_unknown_name_without_close_match_still_lists_installed(site):
    make_dist(site, "pkg-opts", optimizers(adamw="m:A"))
    with pytest.raises(PluginError) as caught:
        Registry().get("optimizer", "sophia")
    assert caught.value.message == "unknown optimizer 'sophia'. Installed: adamw"


def test_unknown_kind_is_an_error():
    with pytest.raises(PluginError, match=r"unknown plugin kind 'optimiser'; did you mean "
                                          r"'optimizer'\?"):
        Registry().names("optimiser")


# -- broken plugins -----------------------------------------------------------------------

BROKEN_MODULES = {
    "import-error": ("import panda_no_such_dependency\n",
                     "ModuleNotFoundError: No module named 'panda_no_such_dependency'"),
    "syntax-error": ("def broken(:\n", "SyntaxError: "),
    "raises": ("raise RuntimeError('plugin init exploded')\n",
               "RuntimeError: plugin init exploded"),
    "missing-attribute": ("x = 1\n", "AttributeError: module 'broken_plugin' has no attribute "
                          "'Broken'"),
}


@pytest.mark.parametrize("source, error", BROKEN_MODULES.values(), ids=list(BROKEN_MODULES))
def test_broken_plugin_names_its_package_and_error_and_breaks_nothing_else(site, source, error):
    make_dist(site, "pkg-broken", optimizers(broken="broken_plugin:Broken"),
              {"broken_plugin": source})
    make_dist(site, "pkg-good", optimizers(good="good_plugin:Good"), {"good_plugin": GOOD_PLUGIN})
    registry = Registry()
    assert registry.names("optimizer") == ["broken", "good"]

    with pytest.raises(PluginError) as caught:
        registry.get("optimizer", "broken")
    assert caught.value.message.startswith(
        "optimizer 'broken' from package pkg-broken failed to import (broken_plugin:Broken): "
        + error)
    assert "pkg-broken" in caught.value.hint
    assert isinstance(caught.value.__cause__, Exception)  # the original error is chained

    assert registry.get("optimizer", "good").__name__ == "Good"
    report = {entry.name: error for entry, error in registry.check()}
    assert report["good"] is None
    assert report["broken"].startswith("optimizer 'broken' from package pkg-broken failed")


# -- clashes ------------------------------------------------------------------------------------

def test_two_packages_claiming_one_name_is_an_error_naming_both(site):
    make_dist(site, "pkg-one", optimizers(twin="one_plugin:Good"), {"one_plugin": GOOD_PLUGIN})
    make_dist(site, "pkg-two", optimizers(twin="two_plugin:Good"), {"two_plugin": GOOD_PLUGIN})
    registry = Registry()
    assert registry.names("optimizer") == ["twin"]
    with pytest.raises(PluginError) as caught:
        registry.get("optimizer", "twin")
    assert caught.value.message == "optimizer 'twin' is claimed by 2 packages: pkg-one and pkg-two"
    assert "one_plugin" not in sys.modules and "two_plugin" not in sys.modules

    failed = {entry.package: error for entry, error in registry.check() if entry.name == "twin"}
    assert failed == {"pkg-one": caught.value.message, "pkg-two": caught.value.message}


def test_same_name_in_two_kinds_is_no_clash(site):
    make_dist(site, "pkg-one", {"panda.optimizers": {"x": "one_plugin:Good"}},
              {"one_plugin": GOOD_PLUGIN})
    make_dist(site, "pkg-two", {"panda.schedulers": {"x": "one_plugin:Good"}})
    registry = Registry()
    assert registry.entry("optimizer", "x").package == "pkg-one"
    assert registry.entry("scheduler", "x").package == "pkg-two"


def test_one_package_seen_twice_on_the_path_is_no_clash(site, tmp_path, monkeypatch):
    # e.g. an editable install plus a copy in a --target folder: the first one wins,
    # as it does for `import`.
    older = tmp_path / "older"
    older.mkdir()
    make_dist(site, "pkg-dup", optimizers(dup="new_plugin:Good"), {"new_plugin": GOOD_PLUGIN})
    make_dist(older, "pkg-dup", optimizers(dup="old_plugin:Good"))
    both = SimpleNamespace(distributions=lambda: metadata.distributions(
        path=[str(site), str(older)]))
    monkeypatch.setattr(registry_module, "metadata", both)
    assert Registry().entry("optimizer", "dup").target == "new_plugin:Good"


# -- in-process registration --------------------------------------------------------------

def test_register_in_process_overrides_and_unregister_restores(site):
    make_dist(site, "pkg-one", optimizers(sgd="one_plugin:Good"), {"one_plugin": GOOD_PLUGIN})
    registry = Registry()

    @registry.register("optimizer", "sgd")
    class Local:
        """Registered by a test."""

    assert registry.get("optimizer", "sgd") is Local
    assert registry.entry("optimizer", "sgd").package == registry_module.IN_PROCESS
    registry.register("optimizer", "extra", Local)
    assert registry.names("optimizer") == ["extra", "sgd"]
    registry.unregister("optimizer", "sgd")
    assert registry.entry("optimizer", "sgd").package == "pkg-one"


def test_register_wins_over_a_clash(site):
    make_dist(site, "pkg-one", optimizers(twin="m:A"))
    make_dist(site, "pkg-two", optimizers(twin="m:B"))
    registry = Registry()
    registry.register("optimizer", "twin", object)
    assert registry.get("optimizer", "twin") is object


# -- optional dependencies ----------------------------------------------------------------

def test_missing_optional_dependency_names_the_extra(site):
    with pytest.raises(MissingDependencyError) as caught:
        require("panda_no_such_engine", what="backend 'x'", package="X", extra="x")
    assert caught.value.message == "backend 'x' needs X: pip install 'pandallm[x]'"


def test_plugin_needing_a_missing_dependency_says_so_through_the_registry(site):
    make_dist(site, "pkg-engine", {"panda.backends": {"engine": "engine_plugin:Engine"}},
              {"engine_plugin": """
                  from panda.errors import require
                  require("panda_no_such_engine", what="backend 'engine'", package="Engine",
                          extra="engine")
                  """})
    with pytest.raises(MissingDependencyError) as caught:
        Registry().get("backend", "engine")
    assert caught.value.message == "backend 'engine' needs Engine: pip install 'pandallm[engine]'"


def test_require_shows_a_broken_dependency_of_an_installed_package(site):
    # The package is there but one of *its* imports is missing: that is not "install X".
    (site / "present_engine.py").write_text("import panda_missing_inner_dep\n", encoding="utf-8")
    with pytest.raises(ModuleNotFoundError, match="panda_missing_inner_dep"):
        require("present_engine", what="backend 'x'", package="X", extra="x")


# -- the CLI with a broken plugin installed -----------------------------------------------

@pytest.fixture
def broken_site(tmp_path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    make_dist(folder, "panda-broken-plugin", optimizers(**{"broken-opt": "broken_opt:Broken"}),
              {"broken_opt": "import panda_no_such_dependency\n"})
    make_dist(folder, "panda-good-plugin", optimizers(**{"good-opt": "good_opt:Good"}),
              {"good_opt": GOOD_PLUGIN})
    make_dist(folder, "panda-twin-a", optimizers(**{"twin-opt": "good_opt:Good"}))
    make_dist(folder, "panda-twin-b", optimizers(**{"twin-opt": "good_opt:Good"}))
    return folder


BROKEN_MESSAGE = ("optimizer 'broken-opt' from package panda-broken-plugin failed to import "
                  "(broken_opt:Broken): ModuleNotFoundError: No module named "
                  "'panda_no_such_dependency'")


def test_cli_keeps_working_with_a_broken_plugin_installed(run_panda, broken_site):
    env = {"PYTHONPATH": str(broken_site)}
    assert run_panda("--help", env=env).returncode == 0

    listed = run_panda("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "broken-opt  panda-broken-plugin 0.1" in listed.stdout
    assert "twin-opt    panda-twin-a and panda-twin-b (clash: unusable)" in listed.stdout

    demo = run_panda("recipe", "validate", "recipes/demo.toml", env=env)
    assert demo.returncode == 0, demo.stderr  # it does not name the broken plugin

    named = run_panda("recipe", "validate", "recipes/demo.toml", "--set", "optim.name=broken-opt",
                      env=env)
    assert named.returncode == 2
    assert named.stderr.splitlines()[0] == (
        f"error: --set optim.name=broken-opt: optim.name: {BROKEN_MESSAGE}")
    assert "Traceback" not in named.stderr

    shown = run_panda("plugins", "show", "broken-opt", env=env)
    assert shown.returncode == 2 and shown.stderr.startswith(f"error: {BROKEN_MESSAGE}")


def test_plugins_check_exits_1_and_reports_each_plugin(run_panda, broken_site):
    checked = run_panda("plugins", "--check", "--kind", "optimizer",
                        env={"PYTHONPATH": str(broken_site)})
    assert checked.returncode == 1
    rows = {tuple(line.split(None, 3)[1:3]): line.split(None, 3)[3]
            for line in checked.stdout.splitlines()}
    assert rows[("adamw", "pandallm")] == "ok"
    assert rows[("good-opt", "panda-good-plugin")] == "ok"
    assert rows[("broken-opt", "panda-broken-plugin")] == f"FAILED: {BROKEN_MESSAGE}"
    clash = ("FAILED: optimizer 'twin-opt' is claimed by 2 packages: panda-twin-a and "
             "panda-twin-b")
    assert rows[("twin-opt", "panda-twin-a")] == clash
    assert rows[("twin-opt", "panda-twin-b")] == clash
