"""The CLI surface: help, version, validate, and the exit-code contract."""

from __future__ import annotations


def test_help_lists_commands(run_panda):
    result = run_panda("--help")
    assert result.returncode == 0
    assert "recipe" in result.stdout and "plugins" in result.stdout


def test_validate_demo_recipe(run_panda):
    result = run_panda("recipe", "validate", "recipes/demo.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: recipes/demo.toml is valid")


def test_user_error_is_one_line_exit_2(run_panda):
    result = run_panda("recipe", "validate", "recipes/demo.toml", "--set", "optim.lr=-1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --set optim.lr=-1: optim.lr: Input should be greater than 0 (got -1)")
    assert "Traceback" not in result.stderr
