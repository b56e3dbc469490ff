"""The code is as ruff's formatter writes it (ruff.toml: lines of at most 100 characters), so that
no reviewer argues about layout. Skipped where ruff is not installed, except in CI's fresh
environment (YARN_FRESH_ENV=1), which installs it from requirements.txt."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_code_is_as_ruff_format_writes_it():
    if importlib.util.find_spec("ruff") is None:  # the version requirements.txt pins
        if os.environ.get("YARN_FRESH_ENV") == "1":
            pytest.fail("ruff is missing from CI's environment: it is in requirements.txt")
        pytest.skip("ruff is not installed (pip install ruff)")
    ruff = [sys.executable, "-m", "ruff", "format", "--check", "."]
    done = subprocess.run(ruff, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"run `ruff format .`; these differ:\n{done.stdout}{done.stderr}"
