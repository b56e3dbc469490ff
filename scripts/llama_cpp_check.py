"""Our model against llama.cpp on the same tokens: export a checkpoint to GGUF (hf.export_gguf; with
--rope.<field> flags, under another RoPE first), load the file in llama.cpp (llama-cpp-python,
logits_all), and print, per bin of positions, the mean |delta log-prob| of the true next token and
how often the two engines' top-1 tokens agree.

    python scripts/llama_cpp_check.py --ckpt out/smollm2/ckpt.pt --tokens 4096 \\
        --rope.type yarn --rope.factor 4 --rope.original_context 2048

llama.cpp takes the RoPE from the file's metadata alone (--explicit also passes the YaRN settings as
context parameters); yarn_beta_fast / yarn_beta_slow are always passed, because llama-cpp-python
passes its own 32 / 1 otherwise. Without llama-cpp-python installed it says so and exits 0.
"""

import itertools
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import flags  # noqa: E402
import hf  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402

DEFAULT_TEXT = Path(sysconfig.get_paths()["stdlib"]) / "typing.py"


@dataclass(frozen=True)
class LlamaCppConfig:
    """llama_cpp_check.py's settings.

    ckpt      a checkpoint file, or a run folder holding ckpt.pt
    tokens    positions compared: the first tokens of text
    text      a long document (default: the standard library's typing.py)
    out       where the GGUF is written, overwritten (default: a temporary file)
    gguf      run llama.cpp on this GGUF instead of the checkpoint's export (a control)
    explicit  also pass llama.cpp the YaRN settings as context parameters
    """

    ckpt: str
    tokens: int = 2048
    text: str = str(DEFAULT_TEXT)
    out: str | None = None
    gguf: str | None = None
    explicit: bool = False

    def __post_init__(self):
        flags.check_types(self)
        if self.tokens < 2:
            raise ValueError(f"--tokens must be at least 2, got {self.tokens}")


def bins(n: int, L: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges of n positions: quarters, split again at L where it is inside."""
    edges = sorted({0, n, *(n * k // 4 for k in range(1, 4)), *([L] if L and 0 < L < n else [])})
    return list(itertools.pairwise(edges))


def compare(ours: np.ndarray, theirs: np.ndarray, tokens: list[int], L: int | None) -> list[dict]:
    """Per bin of positions [a, b): mean |delta log p(true next token)| and top-1 agreement of
    two (n, V) log-prob arrays; position i predicts tokens[i + 1] (the last position predicts
    nothing)."""
    n = len(tokens) - 1
    target = np.asarray(tokens[1:])
    lp = [a[np.arange(n), target] for a in (ours[:n], theirs[:n])]
    agree = ours[:n].argmax(-1) == theirs[:n].argmax(-1)
    delta = np.abs(lp[0] - lp[1])
    return [
        {
            "positions": f"{a}-{min(b, n)}",
            "mean_abs_delta": float(delta[a:b].mean()),
            "top1_agreement": float(agree[a:b].mean()),
            "ours_nll": float(-lp[0][a:b].mean()),
            "llama_cpp_nll": float(-lp[1][a:b].mean()),
        }
        for a, b in bins(n + 1, L)
    ]


def log_softmax(logits) -> np.ndarray:
    """Row-wise log-softmax in float32, a block of rows at a time (a 12k x 49k array is 2.4 GB)."""
    x = torch.as_tensor(logits, dtype=torch.float32)
    return torch.cat([torch.log_softmax(b, -1) for b in x.split(1024)]).numpy()


@torch.no_grad()
def ours(model, tokens: list[int]) -> np.ndarray:
    return log_softmax(model(torch.tensor([tokens]))[0])


def llama_cpp_log_probs(path, tokens: list[int], rope, explicit: bool) -> np.ndarray:
    """llama.cpp's log-probs at every position, the file's RoPE metadata deciding the rotation."""
    import llama_cpp

    settings = {"yarn_beta_fast": rope.beta_fast, "yarn_beta_slow": rope.beta_slow}
    if explicit and rope.type == "yarn":
        settings.update(
            rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
            rope_freq_scale=1 / rope.factor,
            yarn_orig_ctx=rope.original_context,
            yarn_ext_factor=1.0,
        )
    llm = llama_cpp.Llama(
        str(path), n_ctx=len(tokens), n_batch=512, logits_all=True, verbose=False, **settings
    )
    llm.eval(tokens)
    return log_softmax(llm.scores[: len(tokens)])


def main(argv) -> None:
    args, overrides = checkpoint.parse_rope_swap(
        argv, LlamaCppConfig, "python scripts/llama_cpp_check.py", __doc__
    )
    for name in ("text", "gguf"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            raise ValueError(f"--{name} {getattr(args, name)} is not a file; give a file's path")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python); nothing compared")
        return
    model, state = checkpoint.load_model(args.ckpt)
    if overrides:
        model.set_rope(checkpoint.rope_with_overrides(model.config, overrides))
    tokenizer = get_tokenizer(state.get("tokenizer", "gpt2"))
    text = Path(args.text).read_text(encoding="utf-8")
    tokens = tokenizer.encode_ordinary(text)[: args.tokens]
    if len(tokens) < args.tokens:
        raise ValueError(
            f"--text {args.text} has {len(tokens)} tokens, fewer than --tokens "
            f"{args.tokens}; give a longer document"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.gguf or args.out or Path(tmp) / "model.gguf")
        if not args.gguf:
            hf.export_gguf(model, state.get("tokenizer", "gpt2"), path, force=True)
        theirs = llama_cpp_log_probs(path, tokens, model.config.rope, args.explicit)
    rope = model.config.rope
    L = rope.original_context or None if rope.type != "default" else None
    scaled = f" (s {rope.factor:g}, L {L})" if L else ""
    print(
        f"{args.ckpt}: rope {rope.type}{scaled}, {len(tokens)} tokens of "
        f"{Path(args.text).name}, llama.cpp on {args.gguf or 'its F32 export'}, settings from "
        f"the file{' and passed explicitly' if args.explicit else ''}"
    )
    print(
        f"{'positions':>13} {'mean |d logp|':>14} {'top-1 agree':>12} {'nll ours':>9} "
        f"{'llama.cpp':>9}"
    )
    for row in compare(ours(model, tokens), theirs, tokens, L):
        print(
            f"{row['positions']:>13} {row['mean_abs_delta']:>14.6f} "
            f"{100 * row['top1_agreement']:>11.1f}% {row['ours_nll']:>9.4f} "
            f"{row['llama_cpp_nll']:>9.4f}"
        )


if __name__ == "__main__":
    sys.exit(flags.cli(main))
