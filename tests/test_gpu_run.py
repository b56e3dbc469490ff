"""scripts/gpu_run.sh, rehearsed on CPU (GPU_RUN_TINY=1): every stage runs at toy sizes and lands its output in
$OUT within what a GPU window hands back (at most 8 files, 16 MiB each, 2 folders deep), so the one GPU command
cannot break unseen; a main job cut by its timeout still returns a report. No outcome here depends on how fast the
machine is: the stage that must be cut is one that blocks. About 45 s on 2 cores (the tiny main job is most of it),
plus the bench's compilation of the decoding step (seconds with inductor's cache warm, up to a minute cold)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
FILES = {"gpu_run.log", "env.txt", "tests.log", "reproduce.log", "reproduce.tar.gz", "bench.json", "bench.log"}


def gpu_run(out: Path, *stages: str, timeout: int = 420, **env):  # the tiny budget, 360 s, and room to stop
    env = {**os.environ, "OUT": str(out), "GPU_RUN_TINY": "1", "YARN_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *stages], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


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
    proc = gpu_run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_lands_in_out_within_the_limits(rehearsal):
    out, stdout = rehearsal
    assert {p.name for p in out.iterdir()} == FILES  # no report.log: the main job wrote its own report
    within_the_return_limits(out)
    stages = stage_lines(out)
    assert list(stages) == ["env", "tests", "reproduce", "bench"]
    assert all(line.startswith("rc=0 ") for line in stages.values()), stages
    assert "ok" in (out / "gpu_run.log").read_text().splitlines()[-1]
    assert "| case |" in stdout  # the bench's table reaches the command's output too


def test_each_stage_output(rehearsal):
    out, _ = rehearsal
    env = (out / "env.txt").read_text()
    assert "torch " in env and "transformers " in env and "nvidia-smi" in env
    assert "6 skipped" in (out / "tests.log").read_text()  # the CUDA-only tests were selected (and skip on CPU)
    assert "all stages done" in (out / "reproduce.log").read_text()
    with tarfile.open(out / "reproduce.tar.gz") as tar:
        names = tar.getnames()
    for name in ("report.md", "results.json", "ppl_finetuned.png", "loss_curves.png"):
        assert f"results/tiny/{name}" in names, name
    assert "runs/tiny/pretrain/summary.json" in names and not any(n.endswith(".pt") for n in names)
    bench = json.loads((out / "bench.json").read_text())
    assert bench["preset"] == "smoke" and bench["finished_utc"]
    assert bench["cases"] and all(c["status"] == "ok" for c in bench["cases"].values())
    compiled = bench["cases"]["sample_B1_compiled"]  # the GPU's compiled-decoding case, here through inductor
    assert compiled["results"]["compiled"]["status"] == "ok" and compiled["tokens_match"]["compiled_ours"] == 1.0
    assert "wrote" in (out / "bench.log").read_text()


def blocking_python(tmp_path: Path, runs_template: Path) -> Path:
    """A Python for gpu_run.sh whose reproduce.py lays down runs_template as the stages it finished, then blocks
    until killed: its stage is always cut, part-way, whatever the machine's speed. Everything else runs for real."""
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/sh
if [ "$1" = reproduce.py ]; then
    while [ $# -gt 0 ]; do [ "$1" = --runs ] && mkdir -p "$(dirname "$2")" && cp -r "{runs_template}" "$2"; shift; done
    exec sleep 600
fi
exec "{sys.executable}" "$@"
""")
    stub.chmod(0o755)
    return stub


def test_a_cut_main_job_returns_a_report_of_what_finished_and_the_next_stage_runs(rehearsal, tmp_path):
    """The main job cut after pretraining and its evaluations: the claims those decide are decided, the rest are
    'not run', the report and the stage outputs come back, and the benchmark still runs."""
    template = tmp_path / "finished"
    with tarfile.open(rehearsal[0] / "reproduce.tar.gz") as tar:
        tar.extractall(template, filter="data")
    runs = template / "runs" / "tiny"
    for unfinished in [*runs.glob("eval/ft_*"), *runs.glob("eval/short_long_*"), runs / "eval/scratch_long.json",
                       runs / "temperature.json"]:
        unfinished.unlink()
    cut = [*runs.glob("ft_*"), *runs.glob("short_long*"), runs / "scratch_long", runs / "plain"]
    for folder in cut:  # the ablation runs last: a cut this early loses it too
        shutil.rmtree(folder)
    shutil.rmtree(template / "results")
    out = tmp_path / "out"
    proc = gpu_run(out, "reproduce", "bench", GPU_RUN_LIMITS="reproduce=6",
                   YARN_PYTHON=str(blocking_python(tmp_path, runs)))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = stage_lines(out)
    # 124: it stopped on SIGTERM; 137: SIGKILL 5 s later
    assert stages["reproduce"].split()[0] in ("rc=124", "rc=137"), stages
    assert stages["report"].startswith("rc=0 ") and stages["bench"].startswith("rc=0 "), stages
    assert "FAILED" in (out / "gpu_run.log").read_text().splitlines()[-1]
    with tarfile.open(out / "reproduce.tar.gz") as tar:
        report = tar.extractfile("results/tiny/report.md").read().decode()
        results = json.loads(tar.extractfile("results/tiny/results.json").read())
        assert "runs/tiny/stages.json" in tar.getnames()
    held = {}  # claim number -> the verdicts of the claims under it
    for c in results["claims"]:
        held.setdefault(c["claim"].split(".")[0], set()).add(c["held"])
    decided = {"1", "1b", "1c", "1d", "5", "5a"}  # what the pretrained model alone decides
    assert all(held[k] <= {"yes", "no", "within noise"} for k in decided), held
    assert all(held[k] == {"not run"} for k in set(held) - decided), held
    assert "This run did not finish" in report and "| not run |" in report
    assert "8 of 35 claims decided" in (out / "report.log").read_text()
    assert json.loads((out / "bench.json").read_text())["cases"]
    assert {p.name for p in out.iterdir()} == FILES - {"env.txt", "tests.log"} | {"report.log"}
    within_the_return_limits(out)


def test_an_unknown_stage_is_an_error(tmp_path):
    proc = gpu_run(tmp_path, "bench", "train", timeout=30)
    assert proc.returncode == 2 and "unknown stage 'train'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran
