"""The code is as ruff's formatter writes it (ruff.toml: lines of at most 100 characters), so that
no reviewer argues about layout, and no line of it, Python or shell, passes 100 characters (the
formatter leaves long strings, docstrings and comments as they are). The ruff checks skip where
ruff is not installed, except in CI's fresh environment (YARN_FRESH_ENV=1), which installs it from
requirements.txt; the shell check needs nothing and always runs."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WIDTH = int(re.search(r"^line-length = (\d+)$", (REPO / "ruff.toml").read_text(), re.M)[1])


def ruff(*args: str) -> subprocess.CompletedProcess:
    """`python -m ruff ARGS` at the repository's root, or a skip (a failure in CI) without ruff."""
    if importlib.util.find_spec("ruff") is None:  # the version requirements.txt pins
        if os.environ.get("YARN_FRESH_ENV") == "1":
            pytest.fail("ruff is missing from CI's environment: it is in requirements.txt")
        pytest.skip("ruff is not installed (pip install ruff)")
    command = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def test_the_code_is_as_ruff_format_writes_it():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, f"run `ruff format .`; these differ:\n{done.stdout}{done.stderr}"


def test_no_python_line_is_over_100_characters():
    """ruff's E501 at ruff.toml's line-length; it lets through only a line that is one token that
    cannot be broken, such as a URL."""
    done = ruff("check", "--select", "E501", "--output-format", "concise", ".")
    assert done.returncode == 0, (
        f"lines over {WIDTH} characters (file:line:column); split long strings into implicitly "
        f"joined pieces, re-flow docstrings and comments:\n{done.stdout}{done.stderr}"
    )


def shell_scripts() -> list[Path]:
    """The shell scripts git tracks: *.sh, and files whose #! line runs sh or bash (.ci/run).
    Outside a checkout, the *.sh files on disk and .ci/run."""
    try:
        names = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*.sh") if ".venv" not in p.parts]
        names.append(".ci/run")
    paths = [REPO / n for n in names if (REPO / n).is_file()]
    return [p for p in paths if p.suffix == ".sh" or runs_a_shell(p)]


def runs_a_shell(path: Path) -> bool:
    with open(path, "rb") as f:
        return re.match(rb"#!.*\b(ba)?sh\b", f.readline(200)) is not None


def test_no_shell_line_is_over_100_characters():
    scripts = shell_scripts()
    assert REPO / "test.sh" in scripts and REPO / ".ci" / "run" in scripts, scripts
    long = [
        f"{path.relative_to(REPO)}:{number} ({len(line)} characters)"
        for path in scripts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > WIDTH
    ]
    assert not long, f"lines over {WIDTH} characters:\n" + "\n".join(long)
