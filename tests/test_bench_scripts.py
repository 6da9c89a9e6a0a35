"""The benchmarks run for minutes before they write their JSON; a stale import would fail only at the
end (bench/step_speed.py once imported steps_per_call from a module that no longer had it). Every
``from labtools... import name`` in bench/ must name something that exists."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_script_imports_from_labtools_exist(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "labtools":
            mod = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(mod, alias.name):
                    try:  # a submodule: from labtools import data
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
