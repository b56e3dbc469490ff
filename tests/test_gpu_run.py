"""scripts/gpu_run.sh, rehearsed on CPU (GPU_RUN_TINY=1): every stage runs at toy sizes and lands its output in
$OUT within what a GPU window hands back (at most 8 files, 16 MiB each, 2 folders deep), so the one GPU command
cannot break unseen. About 45 s on 2 cores (the tiny main job is most of it)."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
FILES = {"gpu_run.log", "env.txt", "tests.log", "reproduce.log", "reproduce.tar.gz", "bench.json", "bench.log"}


def gpu_run(out: Path, *stages: str, timeout: int = 240, **env):
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *stages], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OUT": str(out), "GPU_RUN_TINY": "1", "YARN_PYTHON": sys.executable,
                               **env})
    return proc, time.perf_counter() - t0


def stage_lines(out: Path) -> dict[str, str]:
    """{stage: 'rc=... seconds=... limit=...'} from gpu_run.log."""
    lines = (out / "gpu_run.log").read_text().splitlines()
    return {line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("stage ")}


def within_the_return_limits(out: Path):
    paths = [p for p in out.rglob("*")]
    files = [p for p in paths if p.is_file()]
    assert len(files) <= 8, sorted(str(p) for p in files)
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in paths)  # at most 2 folders deep


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    proc, elapsed = gpu_run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return out, proc.stdout, elapsed


def test_every_stage_lands_in_out_within_the_limits(rehearsal):
    out, stdout, elapsed = rehearsal
    assert elapsed < 90, f"the rehearsal took {elapsed:.0f}s"
    assert {p.name for p in out.iterdir()} == FILES
    within_the_return_limits(out)
    stages = stage_lines(out)
    assert list(stages) == ["env", "tests", "reproduce", "bench"]
    assert all(line.startswith("rc=0 ") for line in stages.values()), stages
    assert "ok" in (out / "gpu_run.log").read_text().splitlines()[-1]
    assert "| case |" in stdout  # the bench's table reaches the command's output too


def test_each_stage_output(rehearsal):
    out, _, _ = rehearsal
    env = (out / "env.txt").read_text()
    assert "torch " in env and "transformers " in env and "nvidia-smi" in env
    assert "6 skipped" in (out / "tests.log").read_text()  # the CUDA-only tests were selected (and skip on CPU)
    assert "all stages done" in (out / "reproduce.log").read_text()
    with tarfile.open(out / "reproduce.tar.gz") as tar:
        names = tar.getnames()
    for name in ("report.md", "results.json", "ppl_finetuned.png"):
        assert f"results/tiny/{name}" in names, name
    assert "runs/tiny/pretrain/summary.json" in names and not any(n.endswith(".pt") for n in names)
    bench = json.loads((out / "bench.json").read_text())
    assert bench["preset"] == "smoke" and bench["finished_utc"]
    assert bench["cases"] and all(c["status"] == "ok" for c in bench["cases"].values())
    assert "wrote" in (out / "bench.log").read_text()


def test_a_stage_cut_by_its_timeout_keeps_what_it_made_and_the_next_stage_runs(tmp_path):
    proc, _ = gpu_run(tmp_path, "reproduce", "bench", GPU_RUN_LIMITS="reproduce=6")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = stage_lines(tmp_path)
    # 124: it stopped on SIGTERM; 137: SIGKILL 5 s later (a SIGTERM in a training run's last step is not acted on)
    assert stages["reproduce"].split()[0] in ("rc=124", "rc=137") and stages["bench"].startswith("rc=0 "), stages
    assert "FAILED" in (tmp_path / "gpu_run.log").read_text().splitlines()[-1]
    assert (tmp_path / "reproduce.log").stat().st_size > 0 and (tmp_path / "reproduce.tar.gz").is_file()
    assert json.loads((tmp_path / "bench.json").read_text())["cases"]
    within_the_return_limits(tmp_path)


def test_an_unknown_stage_is_an_error(tmp_path):
    proc, _ = gpu_run(tmp_path, "bench", "train", timeout=30)
    assert proc.returncode == 2 and "unknown stage 'train'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran
