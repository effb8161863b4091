"""Console scripts cover every entry point, and Hydra's tab completion answers for them."""

from __future__ import annotations

import importlib
import re

import pytest

from .conftest import REPO, run_module


def test_every_entry_point_has_a_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry_modules = {path.stem for path in (REPO / "nanogpt").glob("*.py")
                     if re.search(r'^if __name__ == "__main__":', path.read_text(), re.M)}
    # nanogpt-X runs what ``python -m nanogpt.X`` runs (train's command line lives in launch.py).
    assert {name.removeprefix("nanogpt-") for name in scripts} == entry_modules
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_tab_completion_answers_for_keys_and_group_options(tmp_path):
    """What `eval "$(nanogpt-eval -sc install=bash)"` asks on each <TAB>."""
    result = run_module("nanogpt.eval", "-sc", "query=bash", cwd=tmp_path,
                        env={"COMP_LINE": "nanogpt-eval dataset=shakespeare"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dataset=shakespeare", "dataset=shakespeare_char"]
