"""ruff passes on qpass/, tests/, tools/ and benchmarks/ with the rules pyproject.toml selects (among them TID251: onnxruntime only in runtime.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_passes_on_qpass():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "qpass", "tests", "tools", "benchmarks"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check failed:\n{proc.stdout}{proc.stderr}"
