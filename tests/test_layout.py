"""The codebase stays as small as the models it is compared with, counted in bytes (a cap in lines
rewards wide lines), as ruff's formatter writes it (tests/test_style.py): the reading core (rope.py,
model.py, train.py, sample.py, generate.py) within issue 32's 62 KB (nanoGPT's three files are
35 KB), model.py within 330 lines, at most 2% of the core's lines over 100 characters. Everything
outside tests/ within 450 KB (314 KB when decoding moved to generate.py; issue 30's claims +22 KB; a
real model: the GGUF reader 14 KB, its tokenizer and imports ~12 KB, the no-fine-tuning job
pretrained.py 36 KB; issue 33's fine-tuning of it at 4L +15.5 KB; issue 34's GGUF writer and
llama.cpp check +17 KB; the formatter +18 KB). No function over 100 lines (60 before the formatter
put each item of a long call on its own line), no line over 120 characters, no docstring pointing
to a file the repository does not have, and imports that only go down the floors: rope.py at the
bottom imports nothing of ours, so it can be read alone."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = ("rope.py", "model.py", "train.py", "sample.py", "generate.py")


def sources() -> list[Path]:
    """The repository's .py files outside tests/, as git tracks them (or, outside a checkout, on
    disk)."""
    try:
        names = subprocess.run(
            ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py") if ".venv" not in p.parts]
    return [REPO / n for n in names if not n.startswith("tests/") and (REPO / n).exists()]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_the_reading_core_is_at_most_62_kb():
    sizes = {name: (REPO / name).stat().st_size for name in CORE}
    assert sum(sizes.values()) <= 62_000, sizes


def test_model_py_is_at_most_330_lines():
    assert len(lines(REPO / "model.py")) <= 330


def test_at_most_2_percent_of_the_core_lines_run_past_100_characters():
    core = [line for name in CORE for line in lines(REPO / name)]
    wide = [line for line in core if len(line) > 100]
    assert len(wide) <= 0.02 * len(core), wide[:5]


def test_everything_outside_tests_is_at_most_450_kb():
    sizes = {str(p.relative_to(REPO)): p.stat().st_size for p in sources()}
    assert sum(sizes.values()) <= 450_000, sorted(sizes.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_over_100_lines_and_no_line_over_120_characters(path):
    text = path.read_text(encoding="utf-8")
    long_lines = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
    assert not long_lines, f"lines over 120 characters: {long_lines}"
    long_functions = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 100
    ]
    assert not long_functions, long_functions


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_comments_stand_on_their_own(path):
    """A docstring or comment never sends the reader to a document outside the repository."""
    outside = re.findall(
        r"EXPERIMENT\.md|YARN_SPEC|STYLE(?:\.md| #)|shared/", path.read_text(encoding="utf-8")
    )
    assert not outside, outside


# Floors, bottom up: a module imports only modules on floors below its own. A module not listed is a
# script on a floor above them all (another developer's new file starts there), which no listed
# module may import.
FLOORS = [
    (
        "rope.py",
        "system.py",
        "loss.py",
        "prev_tokens.py",
        "data/__init__.py",
        "data/tokenizer.py",
        "data/recall.py",
    ),
    ("flags.py",),  # reads --config with system.read_json
    ("model.py", "figures.py", "data/loader.py", "data/prepare.py", "gguf_io.py"),
    ("checkpoint.py", "config.py", "generate.py"),
    ("train.py", "eval.py", "sample.py", "hf.py", "report.py"),
    ("pretrained.py",),  # the smollm2 presets: reproduce.py hands them over
    ("reproduce.py",),
    ("bench.py",),
]


def our_imports(path: Path, ours: set[str]) -> set[str]:
    """The project modules a file imports, as paths (data/loader.py), at any depth (inside
    functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [
                f"{node.module}.{a.name}" for a in node.names
            ]  # `from data import loader`
        found |= {name.replace(".", "/") + ".py" for name in names} & ours
    return found


def test_imports_go_down_the_floors_and_rope_imports_nothing_of_ours():
    ours = {str(p.relative_to(REPO)) for p in sources()}
    floor = {name: level for level, names in enumerate(FLOORS) for name in names}
    assert our_imports(REPO / "rope.py", ours) == set()
    upward = {}
    for name in sorted(ours):
        level = floor.get(name, len(FLOORS))
        wrong = sorted(
            other
            for other in our_imports(REPO / name, ours)
            if floor.get(other, len(FLOORS)) >= level
        )
        if wrong:
            upward[name] = wrong
    assert not upward, (
        f"imports on the module's own floor or above (tests/test_layout.FLOORS): {upward}"
    )


def test_rope_py_reaches_its_first_variant_within_80_lines():
    """Config first, then the math: the first variant function (a `*_rope`) starts within the
    first 80 lines."""
    tree = ast.parse((REPO / "rope.py").read_text(encoding="utf-8"))
    first = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_rope")
    )
    assert first.lineno <= 80, (first.name, first.lineno)


# Each script's settings class says what its fields mean in a table in its docstring
# (flags.field_help); a row naming no field (a typo, a renamed field) would drop out of --help.
SETTINGS = [
    ("config", "RunConfig"),
    ("model", "ModelConfig"),
    ("rope", "RopeConfig"),
    ("sample", "SampleConfig"),
    ("eval", "EvalConfig"),
    ("bench", "BenchConfig"),
    ("reproduce", "ReproduceConfig"),
    ("report", "ReportConfig"),
    ("rope_check", "CheckConfig"),
    ("data.prepare", "PrepareConfig"),
    ("hf", "ExportConfig"),
    ("hf", "ImportConfig"),
]


@pytest.mark.parametrize("module, name", SETTINGS, ids=[f"{m}.{c}" for m, c in SETTINGS])
def test_settings_tables_name_only_real_fields(module, name):
    import dataclasses
    import importlib
    import sys

    sys.path.insert(0, str(REPO))
    import flags

    cls = getattr(importlib.import_module(module), name)
    rows = re.findall(r"^    (\w+) {2,}\S", cls.__doc__ or "", flags=re.M)  # name, 2+ spaces, text
    assert rows and set(rows) <= {f.name for f in dataclasses.fields(cls)}, rows
    assert set(flags.field_help(cls)) == set(rows)


# The front door and its pages: README.md stays a front door (issue 32: at most 2,500 words,
# nanoGPT's is about 2,100; the rest lives in docs/), and every link from it or a docs/ page to a
# file here, or to a heading, lands.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "PERF_NOTES.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """A markdown file without its fenced code blocks."""
    return re.sub(
        r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL
    )


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#+ +(.+?) *$", prose(path), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_readme_is_a_front_door_of_at_most_2500_words():
    words = len((REPO / "README.md").read_text(encoding="utf-8").split())
    assert words <= 2_500, (
        f"README.md has {words} words; move the details to a page in docs/ and link it"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_to_a_file_or_heading_here_resolves(page):
    broken = []
    for url in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", url):  # https:, mailto:: outside the repository
            continue
        target, _, anchor = url.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists() or REPO not in path.parents:
            broken.append(url)
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(url)
    assert not broken, f"{page.name}: links to no file or heading here: {broken}"
