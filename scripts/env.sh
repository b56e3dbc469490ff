# Sourced by test.sh and reproduce.sh: finds or builds a Python with everything the project needs
# and sets $PY.
#   1. YARN_PYTHON=/path/to/python      use that interpreter as it is
#   2. .venv/ already set up            use it
#   3. python3 already has every module use it (e.g. a GPU box with torch installed and no network);
#                                       skipped when YARN_FRESH_ENV=1 (CI)
#   4. otherwise                        create .venv and pip install requirements.txt into it
# torch: on a machine without an NVIDIA driver the CPU build torch==2.13.0 is installed (TORCH_SPEC
# overrides); with a driver, plain `torch` from PyPI (a CUDA build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULES="torch, einops, tiktoken, numpy, matplotlib, pytest, hypothesis"
STAMP="$ROOT/.venv/.installed-$(cksum < "$ROOT/requirements.txt" | cut -d' ' -f1)"

if [ -n "${YARN_PYTHON:-}" ]; then
    PY="$YARN_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ] && [ -f "$STAMP" ]; then
    PY="$ROOT/.venv/bin/python"
elif [ "${YARN_FRESH_ENV:-0}" != 1 ] && python3 -c "import $MODULES" 2>/dev/null; then
    PY="$(command -v python3)"
else
    echo "setting up .venv (once) ..." >&2
    python3 -m venv "$ROOT/.venv"
    PY="$ROOT/.venv/bin/python"
    "$PY" -m pip install -q --upgrade pip
    if [ -z "${TORCH_SPEC:-}" ]; then
        TORCH_SPEC="torch==2.13.0"
        if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; fi
    fi
    "$PY" -m pip install -q "$TORCH_SPEC"
    "$PY" -m pip install -q -r "$ROOT/requirements.txt"
    touch "$STAMP"
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import $MODULES" || { echo "error: $PY lacks one of: $MODULES" >&2; exit 1; }
