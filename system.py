"""
What every script here does the same way: choose the device and the number format, write a file atomically,
say where a run came from (git commit, versions, hardware), and turn SIGINT / SIGTERM into a flag.
"""

import json
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

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
    """Write data (bytes, str, or a function that writes to a binary file) to a temporary file beside path, fsync
    it, rename it over path and fsync the folder: a crash at any moment leaves the old file or the new one."""
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
    try:  # the rename itself is durable only once the folder is synced; not possible on every platform
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def git_commit() -> tuple[str | None, bool]:
    """(HEAD's commit hash, whether tracked files differ from it); (None, False) outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    try:
        return git("rev-parse", "HEAD").stdout.strip(), bool(git("status", "--porcelain", "-uno").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: str, argv=None) -> dict:
    """Where a run came from: commit, versions, hardware, command line."""
    commit, dirty = git_commit()
    return {"git_commit": commit, "git_dirty": dirty, "torch": str(torch.__version__),
            "python": platform.python_version(), "device": device_name(device),
            "argv": None if argv is None else [str(a) for a in argv],
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a flag the loop reads after each step; a second SIGINT interrupts at once.
    Handlers can only be installed from the main thread; elsewhere (a test's worker thread) signals keep theirs."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
