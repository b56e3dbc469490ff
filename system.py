"""What every script does the same way: the device and number format, atomic writes, JSON read
back (named in the error when it is not what was written), paths to write checked before work, one
run per folder, where a run came from (git, versions, hardware), SIGINT / SIGTERM as a flag,
torchrun's processes, and training throughput."""

import fcntl
import json
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> str:
    """auto = cuda if available, else cpu; cuda or cuda:N only where CUDA is available."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available here; use --device=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(
            f"--device={name} but this machine has {torch.cuda.device_count()} CUDA devices from 0"
        )
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto = bfloat16 on CUDA, float32 elsewhere; otherwise one of DTYPES by name."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def atomic_write(path, data) -> None:
    """Write data (bytes, str, or a function that writes to a binary file) to a temporary file
    beside path, fsync it, rename it over path and fsync the folder: a crash at any moment leaves
    the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename is durable once the folder is synced (POSIX only)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(
    path, fix: str, shape=None, name: str | None = None, lines: bool = False, limit: int = 1 << 28
):
    """The JSON value of a file the project reads back, of the shape given (shape_problem); with
    lines, the list of a JSON Lines file's values, each of that shape. Otherwise a ValueError that
    names the file (as `name`, e.g. '--config c.json'), says what is wrong, then `fix`: what wrote
    it, what to do."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # bounded: /dev/zero, or a wrong file of gigabytes
        if len(data) > limit:
            raise ValueError(f"it is over {limit:,} bytes")
        text = data.decode("utf-8")
        if lines:
            numbered = [
                (i, json_line(i, line))
                for i, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
            value = [v for _, v in numbered]
            problem = first(shape_problem(v, shape, f"line {i}") for i, v in numbered)
        else:
            value = json.loads(text)
            problem = shape_problem(value, shape)
    except OSError as e:
        problem = f"cannot read it ({e.strerror or e})"
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, too large; a NUL in the path
        problem = f"cannot read it as JSON ({type(e).__name__}: {e})"
    if problem:
        raise ValueError(f"{name or path}: {problem}; {fix}")
    return value


def json_line(number: int, line: str):
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None


def first(problems) -> str | None:
    return next(filter(None, problems), None)


KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a bool",
    type(None): "null",
}


def shape_problem(value, shape, where: str = "it") -> str | None:
    """What in a JSON value differs from shape, else None. shape: None (anything), a type or a
    tuple of types (a bool is no number), [shape] (a list of such), {key: shape} (an object with
    these keys, and maybe others), or {str: shape} (an object, every value such)."""

    def at(key):
        return key if where == "it" else f"{where}.{key}"

    if shape is None:
        return None
    kinds = (type(shape),) if isinstance(shape, (dict, list)) else shape
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (type(value) is bool and bool not in kinds):
        got = KINDS[type(value)] if isinstance(value, (dict, list)) else json.dumps(value)[:40]
        return f"{where} is {got}, not {' or '.join(KINDS[k] for k in kinds)}"
    if isinstance(shape, list):
        return first(shape_problem(v, shape[0], f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(shape, dict) and list(shape) == [str]:
        return first(shape_problem(v, shape[str], at(k)) for k, v in value.items())
    if isinstance(shape, dict):
        missing = [key for key in shape if key not in value]
        if missing:
            more = f", ... ({len(missing)} keys missing)" if len(missing) > 3 else ""
            return f"{where} has no {', '.join(map(repr, missing[:3]))}{more}"
        return first(shape_problem(value[k], s, at(k)) for k, s in shape.items())
    return None


def check_writable(path, flag: str, folder: bool = True) -> Path:
    """path as the folder (or, folder=False, the file) that flag names to write, checked before
    any work: a ValueError if it is a file (a folder), if a folder above it is a file, or if this
    process cannot write there. What is missing is made as it is written (atomic_write)."""
    if not str(path).strip():
        raise ValueError(f"{flag} must not be empty")
    path = Path(path)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        fix = "give a new folder or an existing one" if folder else "give a file's path to write"
        raise ValueError(f"{flag} {path} is a {other}, not a {kind}; {fix}")
    nearest = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    nearest = nearest.parent if nearest == path and not folder else nearest
    if not nearest.is_dir():
        raise ValueError(
            f"{flag} {path}: {nearest} is a file, so no {kind} can be made in it; "
            f"choose another {flag}"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {path}: this process cannot write in {nearest}; choose another {flag}"
        )
    return path


class FolderInUse(RuntimeError):
    """Another process holds the run folder's lock: exit 75 (EX_TEMPFAIL, try later), not 2: no
    input was wrong."""

    exit_code = 75


@contextmanager
def lock_folder(folder, flag: str):
    """Hold folder (made if missing) while a run writes to it: flock on folder/.lock, dropped by the
    OS with the process however it ends (no stale lock after a SIGKILL). A second process gets
    FolderInUse at once."""
    check_writable(folder, flag)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = (
                os.pread(fd, 20, 0).decode(errors="replace").strip() or "unknown"
            )  # empty while it starts
            raise FolderInUse(
                f"{folder} is in use by another run (pid {pid}); wait for it, or choose another "
                f"{flag}"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def git_commit() -> tuple[str | None, bool]:
    """(HEAD's commit hash, whether tracked files differ from it); (None, False) outside a git
    checkout."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )

    try:
        return git("rev-parse", "HEAD").stdout.strip(), bool(
            git("status", "--porcelain", "-uno").stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return None, False


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: str, argv=None) -> dict:
    """Where a run came from: commit, versions, hardware, command line."""
    commit, dirty = git_commit()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "device": device_name(device),
        "argv": None if argv is None else [str(a) for a in argv],
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a flag the loop reads after each step; a second SIGINT
    interrupts at once. Handlers can only be installed from the main thread; elsewhere (a test's
    worker thread) signals keep theirs."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {
                sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, d: "Dist", device: str) -> int:
        """The signal every process stops for (0 = none): under DDP they must stop at the same
        step, or hang."""
        if d.world == 1:
            return self.signum
        flag = torch.tensor(float(self.signum), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1


def dist_from_env() -> Dist:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them; one process when absent."""
    if "RANK" not in os.environ:
        return Dist()
    try:
        d = Dist(
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ["WORLD_SIZE"]),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"RANK is set but the torchrun environment is incomplete ({e}); launch with torchrun"
        ) from None
    return d if d.world > 1 else Dist()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # SUM, not AVG: gloo has no AVG
    return x


def duration(seconds: float) -> str:
    """A time in the unit it is read in: 45 s, 12.5 min, 52.9 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Throughput:
    """Tokens/s and MFU of training steps alone: mark() after an eval or a save leaves their time
    out."""

    def __init__(
        self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, step: int
    ):
        self.tokens_per_step, self.flops, self.peak = tokens_per_step, flops_per_token, peak_flops
        # (steps, seconds) per measure(); the first holds start-up and compilation
        self.intervals = []
        self.mark(step)

    def mark(self, step: int):
        self.time, self.step = time.perf_counter(), step

    def rates(self, steps_done: int | None = None) -> tuple[float | None, float | None]:
        """(tokens/s, mfu) since the mark, which moves to steps_done; with no step, the run's
        average so far."""
        if steps_done is not None:
            self.intervals.append((steps_done - self.step, time.perf_counter() - self.time))
            self.mark(steps_done)
        counted = (
            self.intervals[-1:] if steps_done is not None else self.intervals[1:] or self.intervals
        )
        steps, seconds = sum(n for n, _ in counted), sum(t for _, t in counted)
        tokens_per_s = steps * self.tokens_per_step / seconds if steps else None
        return tokens_per_s, tokens_per_s and self.peak and self.flops * tokens_per_s / self.peak


class RunLog:
    """train.py's log: stdout and out_dir/metrics.jsonl (one JSON event a line), from process 0."""

    def __init__(self, out_dir, master: bool = True):
        self.out_dir, self.master = Path(out_dir), master
        self.path = self.out_dir / "metrics.jsonl"

    def start(self, config: dict):
        """Write out_dir/config.json (the run, its model, where it came from: train.start_log's),
        start metrics.jsonl afresh (a resume keeps what was logged before its checkpoint's step, as
        it logs the steps after again), and print the run's header line."""
        if not self.master:
            return
        r, m, p = config["resolved"], config["model"], config["provenance"]
        step, resume = r["start_step"], r["phase"] == "resume"
        fix = "train.py logs an event a line there: delete it (the log is lost, not the checkpoint)"
        logged = (
            read_json(self.path, fix, {"event": str, "step": int}, lines=True)
            if resume and self.path.exists()
            else []
        )
        kept = [e for e in logged if e["step"] < step or (e["event"], e["step"]) == ("eval", step)]
        self.path.write_text("".join(json.dumps(event) + "\n" for event in kept))
        write_json(self.out_dir / "config.json", config)
        commit = (p["git_commit"] or "unknown")[:12] + (" (dirty)" if p["git_dirty"] else "")
        rope = m["rope"]
        self.print(
            f"train.py: {r['phase']} {r['extended_from'] or ''} step {step} -> "
            f"{config['run']['max_steps']}, {r['params'] / 1e6:.1f}M parameters, block "
            f"{m['block_size']}, rope {rope['type']} (factor {rope['factor']}, L "
            f"{rope['original_context']}), {r['tokens_per_step']:,} tokens/step\n  "
            f"{p['device']} x {p['world_size']}, {r['dtype']}, torch {p['torch']}, "
            f"commit {commit}"
        )

    def print(self, text: str):
        if self.master:
            print(text, flush=True)

    def event(self, **record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_text(path, what: str) -> str:
    """The UTF-8 text of a file named on the command line; a ValueError saying what is wrong."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} "
            f"({e.reason}); convert it, e.g. with iconv -t utf-8"
        ) from None
