"""Fault injection for train.py: "nothing lost".

A tiny CPU run (d_model 32, 1 layer, block 16, batch 2, 40 steps, a checkpoint every step) is
SIGKILLed again and again at random moments -- some while out_dir/ckpt.pt is being written -- and
resumed with --init_from=resume each time. After every kill the checkpoints on disk must load (never
half a file); at the end the run must hold exactly the weights, optimizer state, step and metrics of
the same run done in one go. Also: a NaN loss leaves the last good checkpoint byte for byte as it
was, and SIGINT saves and exits 130.

Runs are forked from one long-lived launcher process that has imported torch and train.py once (a
fresh interpreter costs seconds per start on a shared 2-core machine); each forked child runs
train.py's command line exactly as `python train.py` does and is killed with a real SIGKILL.
`pytest -s` shows how many kills were survived.
"""

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import system  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402

BLOCK = 16
MAX_STEPS = 40
TARGET_KILLS = 10  # kills attempted before the run is let finish
MIN_KILLS = 8
TINY = {
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "block_size": BLOCK,
    "batch_size": 2,
    "max_steps": MAX_STEPS,
    "ckpt_interval": 1,
    "keep_checkpoints": 2,
    "eval_interval": 20,
    "eval_batches": 1,
    "log_interval": 1,
    "lr": 3e-3,
    "seed": 1234,
    "dtype": "float32",
    "compile": "false",
    "device": "cpu",
}

# A process that imports train.py once, then forks one child per request; the child runs train.py's
# command line with its stdout/stderr in a log file and exits with the CLI's code. Replies: the
# child's pid, then its exit code (a negative number -N when it died of signal N). It never runs a
# torch op itself, so forking is safe.
LAUNCHER = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
import torch._dynamo  # torch.optim imports it on first use: pay that once here, not in every child
import flags
import train
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if request.get("nan_at_step") is not None:  # the fault: the loss turns NaN at that step
                real, nan_step = train.train_step, request["nan_at_step"]
                train.train_step = lambda r, step: real(r, step) * (
                    float("nan") if step == nan_step else 1.0
                )
            code = flags.cli(train.main, request["argv"], errors=train.ERRORS)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Launcher:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str], log: Path, nan_at_step: int | None = None) -> "Child":
        request = {"argv": [str(a) for a in argv], "log": str(log), "nan_at_step": nan_at_step}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Child(self, int(self.proc.stdout.readline()), log)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    def __init__(self, launcher: Launcher, pid: int, log: Path):
        self.launcher, self.pid, self.log, self.code = launcher, pid, log, None

    def poll(self) -> int | None:
        if self.code is None:
            out = self.launcher.proc.stdout
            if select.select([out], [], [], 0)[0]:
                self.code = int(out.readline())
        return self.code

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"run did not end in {timeout} s:\n{self.output()[-2000:]}")
            time.sleep(0.01)
        return self.code

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def launcher():
    la = Launcher()
    yield la
    la.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus").mkdir()
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py"):
        shutil.copy(stdlib / name, root / "corpus" / name)
    prepare(PrepareConfig(source=str(root / "corpus"), out=str(root / "data"), block_size=BLOCK))
    return root / "data"


def flags(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    return [
        f"--{k}={v}"
        for k, v in {**TINY, "data_dir": data_dir, "out_dir": out_dir, **overrides}.items()
    ]


def temp_files(out_dir: Path) -> set[str]:
    return {p.name for p in out_dir.glob(".ckpt*.tmp")} if out_dir.exists() else set()


def same(a, b, where="") -> None:
    """Recursive exact equality of checkpoint pieces: tensors with torch.equal, the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def events(out_dir: Path) -> dict[tuple[str, int], float]:
    found = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        key = (e["event"], e["step"])
        assert key not in found, f"{key} logged twice"
        found[key] = e.get("train_loss", e.get("val_loss"))
    return found


def check_on_disk(out_dir: Path, last_step: int) -> int:
    """Every checkpoint in out_dir loads; ckpt.pt never goes back in steps. Returns ckpt.pt's step
    (-1: none)."""
    for path in sorted(out_dir.glob("ckpt_*.pt")):
        state = checkpoint.load(path)
        assert path.name == f"ckpt_{state['step']}.pt"
    if not (out_dir / "ckpt.pt").exists():
        assert last_step == -1, "ckpt.pt disappeared"
        return -1
    state = checkpoint.load(out_dir / "ckpt.pt")
    assert state["step"] >= last_step, f"ckpt.pt went back from step {last_step} to {state['step']}"
    checkpoint.model_from_state(state)
    return state["step"]


def wait_for(child: Child, condition, timeout: float = 60) -> bool:
    """Poll (every ~1 ms) until condition() holds; False if the child ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError(f"timed out:\n{child.output()[-2000:]}")


def test_sigkill_at_random_moments_loses_nothing(launcher, data_dir, tmp_path):
    rng = random.Random(20240611)
    out = tmp_path / "killed"
    kills, during_write, last_step, attempts, stale = 0, 0, -1, 0, set()
    while True:
        attempts += 1
        assert attempts < 60, "no progress"
        resume = (out / "ckpt.pt").exists()
        argv = flags(data_dir, out, init_from="resume" if resume else "scratch")
        before = temp_files(out)
        child = launcher.start(argv, tmp_path / f"log{attempts}.txt")
        if kills >= TARGET_KILLS:
            assert child.wait() == 0, child.output()[-3000:]
            break
        mode = rng.choice(["write", "write", "delay", "early"])
        if (
            mode == "write"
        ):  # the k-th checkpoint write of this attempt: kill while its temp file exists
            k = rng.randint(1, 3)
            seen: set[str] = set()

            def writing():
                seen.update(temp_files(out) - before)
                return len(seen) >= k

            alive = wait_for(child, writing)
            if alive:
                time.sleep(rng.uniform(0, 0.004))
        elif mode == "delay":  # some time into training
            alive = wait_for(child, lambda: "step " in child.output())
            if alive:
                time.sleep(rng.uniform(0, 0.3))
        else:  # during start-up: config.json, metrics.jsonl rewrite, loading the checkpoint
            time.sleep(rng.uniform(0, 0.15))
            alive = True
        child.kill()
        code = child.wait()
        if code == 0:  # finished before the kill landed
            break
        assert code == -signal.SIGKILL, (code, child.output()[-3000:])
        kills += 1
        left = temp_files(out) - before
        if left:
            during_write += 1
            stale |= left
        last_step = check_on_disk(out, last_step)

    print(
        f"survived {kills} SIGKILLs ({during_write} left a checkpoint half-written) "
        f"in {attempts} runs; "
        f"stale temp files: {len(temp_files(out))}"
    )
    assert kills >= MIN_KILLS
    assert during_write >= 2, "no kill landed during a checkpoint write"

    # the same run in one go
    ref = tmp_path / "reference"
    child = launcher.start(flags(data_dir, ref), tmp_path / "log_ref.txt")
    assert child.wait() == 0, child.output()[-3000:]
    a, b = checkpoint.load(out / "ckpt.pt"), checkpoint.load(ref / "ckpt.pt")
    assert a["step"] == b["step"] == MAX_STEPS
    same(a["model"], b["model"], "model")
    same(a["optimizer"], b["optimizer"], "optimizer")
    same(a["metrics"], b["metrics"], "metrics")
    assert events(out) == events(ref)  # every step's loss logged once, the same as uninterrupted
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == sorted(
        p.name for p in ref.glob("ckpt*.pt")
    )

    # What a kill mid-write leaves: its temp file. Nothing reads it (every load above ignored it)
    # and the later saves were not disturbed by it; no clean save leaves one. Whether they pile up:
    # the next test.
    assert temp_files(out) <= stale


def test_stale_temp_file_is_ignored_by_load_and_save(launcher, data_dir, tmp_path):
    """A temp file as a kill mid-write leaves it (a truncated torch zip) does not disturb loading or
    saving."""
    out = tmp_path / "run"
    child = launcher.start(flags(data_dir, out, max_steps=4, stop_at_step=2), tmp_path / "a.txt")
    assert child.wait() == 0, child.output()
    good = (out / "ckpt.pt").read_bytes()
    stale = out / ".ckpt.pt.k1ll3d.tmp"
    stale.write_bytes(good[: len(good) // 2])
    assert checkpoint.load(out)["step"] == 2
    child = launcher.start(
        flags(data_dir, out, init_from="resume", max_steps=4), tmp_path / "b.txt"
    )
    assert child.wait() == 0, child.output()
    assert checkpoint.load(out)["step"] == 4
    assert not stale.exists(), (
        "a resumed run leaves the stale temp file of the interrupted one in out_dir"
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("ckpt_interval, log_interval", [(2, 1), (1, 100)])
def test_nan_loss_leaves_the_last_good_checkpoint_byte_identical(
    launcher, data_dir, tmp_path, ckpt_interval, log_interval
):
    # log_interval 100: the NaN is found only by the check before the next save, which must then not
    # save
    out = tmp_path / "nan"
    common = dict(max_steps=12, ckpt_interval=ckpt_interval, log_interval=log_interval)
    child = launcher.start(flags(data_dir, out, stop_at_step=4, **common), tmp_path / "a.txt")
    assert child.wait() == 0, child.output()[-3000:]
    files = {p.name: sha(p) for p in out.glob("ckpt*.pt")}
    assert "ckpt.pt" in files and "ckpt_4.pt" in files
    child = launcher.start(
        flags(data_dir, out, init_from="resume", **common), tmp_path / "b.txt", nan_at_step=4
    )
    assert child.wait() == 1, child.output()[-3000:]
    err = child.output()
    assert "error: loss is nan at step 4" in err and "step 4" in err and "Traceback" not in err, err
    assert {
        p.name: sha(p) for p in out.glob("ckpt*.pt")
    } == files  # nothing written, nothing deleted
    assert not temp_files(out)
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == 4
    assert all(t.isfinite().all() for t in state["model"].values())
    # and the run goes on from it once the fault is gone
    child = launcher.start(flags(data_dir, out, init_from="resume", **common), tmp_path / "c.txt")
    assert child.wait() == 0, child.output()[-3000:]
    assert checkpoint.load(out / "ckpt.pt")["step"] == 12


def test_sigint_saves_and_exits_130(launcher, data_dir, tmp_path):
    out = tmp_path / "int"
    child = launcher.start(
        flags(data_dir, out, max_steps=100000, ckpt_interval=100000, eval_interval=100000),
        tmp_path / "int.txt",
    )
    assert wait_for(child, lambda: "step 3/" in child.output()), child.output()
    child.kill(signal.SIGINT)
    assert child.wait() == 130, child.output()[-3000:]
    log = child.output()
    assert "stopped (SIGINT)" in log and "Traceback" not in log
    state = checkpoint.load(out / "ckpt.pt")
    logged = max(s for (kind, s) in events(out) if kind == "train")
    assert state["step"] == logged + 1  # the step in progress was finished and saved
    assert not temp_files(out)
    child = launcher.start(
        flags(data_dir, out, init_from="resume", max_steps=state["step"] + 2), tmp_path / "r.txt"
    )
    assert child.wait() == 0, child.output()[-3000:]
    assert checkpoint.load(out / "ckpt.pt")["step"] == state["step"] + 2


# One run per folder: a lock on out_dir (system.lock_folder), which the operating system drops with
# its holder
def test_a_second_run_on_a_busy_out_dir_is_refused_and_the_first_finishes_unharmed(
    launcher, data_dir, tmp_path
):
    out, endless = (
        tmp_path / "busy",
        dict(max_steps=100000, ckpt_interval=100000, eval_interval=100000),
    )
    first = launcher.start(flags(data_dir, out, **endless), tmp_path / "first.txt")
    assert wait_for(first, lambda: "step 3/" in first.output()), first.output()
    # a second `python train.py` on the same folder (the launcher runs one child at a time); the
    # timeout is a hang guard: a refused run must not wait for the lock
    second = subprocess.run(
        [sys.executable, "train.py", *flags(data_dir, out, **endless)],
        cwd=REPO,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 75, second.stderr[-3000:]
    assert (
        f"error: {out} is in use by another run (pid {first.pid}); "
        "wait for it, or choose another --out_dir"
        in second.stderr
        and "Traceback" not in second.stderr
    ), second.stderr
    assert first.poll() is None  # refused while the first still held the folder, not after it ended
    first.kill(signal.SIGINT)
    assert first.wait() == 130, first.output()[-3000:]
    stopped = checkpoint.load(out / "ckpt.pt")
    # unharmed: the same weights, optimizer state and metrics as the run alone, stopped at the same
    # step
    ref = tmp_path / "alone"
    child = launcher.start(
        flags(data_dir, ref, stop_at_step=stopped["step"], **endless), tmp_path / "ref.txt"
    )
    assert child.wait() == 0, child.output()[-3000:]
    alone = checkpoint.load(ref / "ckpt.pt")
    for key in ("step", "model", "optimizer", "metrics"):
        same(stopped[key], alone[key], key)


def test_a_sigkilled_run_leaves_an_out_dir_the_next_run_can_take(launcher, data_dir, tmp_path):
    out = tmp_path / "killed"
    child = launcher.start(
        flags(data_dir, out, max_steps=100000, ckpt_interval=2), tmp_path / "a.txt"
    )
    assert wait_for(child, lambda: "step 5/" in child.output()), child.output()
    child.kill()
    assert child.wait() == -signal.SIGKILL
    assert (out / ".lock").read_text().split() == [
        str(child.pid)
    ]  # the file stays; its lock went with the process
    child = launcher.start(
        flags(data_dir, out, init_from="resume", max_steps=8), tmp_path / "b.txt"
    )
    assert child.wait() == 0, child.output()[-3000:]
    assert checkpoint.load(out / "ckpt.pt")["step"] == 8


def test_reproduce_on_a_busy_runs_folder_exits_75_before_writing(tmp_path):
    runs = tmp_path / "runs"
    with system.lock_folder(
        runs, "--runs"
    ):  # this process holds the folder, as a running main job would
        proc = subprocess.run(
            [
                sys.executable,
                "reproduce.py",
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--runs",
                runs,
                "--out",
                tmp_path / "report",
                "--data_dir",
                tmp_path / "data",
                "--data_source",
                Path(sysconfig.get_paths()["stdlib"]) / "json",
            ],
            cwd=REPO,
            timeout=300,
            capture_output=True,
            text=True,
        )  # the timeout: a hang guard
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert (
        f"error: {runs} is in use by another run (pid {os.getpid()}); "
        "wait for it, or choose another --runs"
        in proc.stderr
        and "Traceback" not in proc.stderr
    ), proc.stderr
    assert [p.name for p in runs.iterdir()] == [".lock"] and not (tmp_path / "data").exists()
