"""Sample from a checkpoint, streaming the text to stdout (a header and warnings to stderr):

    python sample.py --ckpt out/pretrain --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/pretrain --prompt_file long.txt --max_context 4096 \
        --rope.type=dynamic_yarn

--rope.<field>=<value> replaces that field of the checkpoint's RoPE config (weights untouched).
"""

import os
import sys
from dataclasses import dataclass
from functools import partial

import torch

import checkpoint
import flags
from checkpoint import parse_rope_swap, rope_summary, rope_with_overrides
from data.tokenizer import StreamDecoder, get_tokenizer
from generate import RULES, generate, sampler
from system import dtype_name, pick_device, pick_dtype, read_text

SEPARATOR = "---------------"  # between samples, as nanoGPT


@dataclass(frozen=True)
class SampleConfig:
    """sample.py's settings:
    ckpt             a checkpoint file, or a run folder holding ckpt.pt
    prompt           the prompt; empty: start a document
    prompt_file      read the prompt from this UTF-8 file instead
    temperature      0 = greedy
    top_k            sample among the k likeliest tokens
    max_context      the longest prompt + new tokens; default the checkpoint's block_size
    truncate_prompt  keep the prompt's last tokens where it does not fit
    rope_rule        follow or capacity: a dynamic variant's l' (generate.py)
    compile          compile the decoding step: repaid after thousands of tokens
    dtype            float32, bfloat16, or auto (bfloat16 on CUDA)
    """

    ckpt: str
    prompt: str = ""
    prompt_file: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 200
    seed: int = 1337
    num_samples: int = 1
    stop_at_eot: bool = True
    max_context: int | None = None
    truncate_prompt: bool = False
    rope_rule: str = "follow"
    compile: bool = False
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        flags.check_types(self)
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.prompt and self.prompt_file is not None:
            raise ValueError("give --prompt or --prompt_file, not both")
        if self.rope_rule not in RULES:
            raise ValueError(f"--rope_rule must be follow or capacity, got {self.rope_rule!r}")
        for name in ("max_new_tokens", "top_k", "num_samples", "max_context"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


class ContextError(ValueError):
    """The prompt does not fit the context."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids ("<|endoftext|>" in it is text), or [end-of-text]."""
    return tokenizer.encode_ordinary(prompt) if prompt else [tokenizer.eot_token]


def fit_context(
    n_prompt: int, max_new_tokens: int, context: int, truncate_prompt=False, block_size=None
) -> tuple[int, int, list[str]]:
    """(prompt tokens kept from its end, new tokens, warnings) for P prompt and N new tokens in a
    context C: N lowered to C - P if P < C < P + N; a ContextError if P >= C, unless
    truncate_prompt keeps the last max(C - N, 1)."""
    warnings, keep = [], n_prompt
    if truncate_prompt and keep + max_new_tokens > context and keep > 1:
        keep = max(context - max_new_tokens, 1)
        warnings.append(
            f"--truncate_prompt: kept the last {keep} of the prompt's {n_prompt} "
            f"tokens, to fit the context of {context}"
        )
    if keep >= context:
        raise ContextError(
            f"the prompt is {n_prompt} tokens, too long for the context of {context} tokens (it "
            "must leave room for a new token); pass --truncate_prompt to keep its last tokens, or "
            f"--max_context N (e.g. N = {n_prompt + max_new_tokens}) to run longer knowingly"
        )
    if keep + max_new_tokens > context:
        warnings.append(
            f"max_new_tokens lowered from {max_new_tokens} to {context - keep} to fit "
            f"the context of {context} (--max_context allows more)"
        )
        max_new_tokens = context - keep
    if block_size is not None and keep + max_new_tokens > block_size:
        warnings.append(
            f"the sequence (up to {keep + max_new_tokens} tokens) runs past the "
            f"context the model was trained at ({block_size})"
        )
    return keep, max_new_tokens, warnings


def generate_text(
    model, tokenizer, prompt: str, args: SampleConfig, generator=None, on_text=None, on_warning=None
) -> str:
    """The text after the prompt; on_text(piece) gets each run of whole characters as decoded,
    on_warning(message) fit_context's warnings."""
    tokens, block_size = encode_prompt(tokenizer, prompt), model.config.block_size
    if max(tokens) >= model.config.vocab_size:
        raise ValueError(
            f"the prompt has token id {max(tokens)}, outside the model's vocabulary "
            f"of {model.config.vocab_size}: a checkpoint of another tokenizer"
        )
    context = args.max_context or block_size
    keep, n, warnings = fit_context(
        len(tokens), args.max_new_tokens, context, args.truncate_prompt, block_size
    )
    for message in warnings if on_warning else ():
        on_warning(message)
    choose = sampler(args.temperature, args.top_k, generator, vocab_limit=tokenizer.n_vocab)
    stop = tokenizer.eot_token if args.stop_at_eot else None
    idx = torch.tensor([tokens[len(tokens) - keep :]], device=model.tok_emb.weight.device)  # (1, P)
    decoder = StreamDecoder(tokenizer)

    def emit(piece: str) -> str:
        if piece and on_text is not None:
            on_text(piece)
        return piece

    new = (int(t[0]) for t in generate(model, idx, n, choose, args.rope_rule, args.compile, stop))
    return "".join(emit(decoder.push([t])) for t in new if t != stop) + emit(decoder.flush())


def main(argv) -> None:
    args, overrides = parse_rope_swap(argv, SampleConfig, "python sample.py", __doc__)
    prompt, device = args.prompt, pick_device(args.device)
    if args.prompt_file is not None:
        prompt = read_text(args.prompt_file, "the prompt file")
    dtype = pick_dtype(args.dtype, device)
    model, state = checkpoint.load_model(args.ckpt, device)
    rope_text = rope_summary(model.config.rope)
    if overrides:
        model.set_rope(rope_with_overrides(model.config, overrides))  # weights untouched
        rope_text += f", overridden to {rope_summary(model.config.rope)}"
    model.to(dtype)  # the RoPE tables stay fp32
    tokenizer = get_tokenizer(state.get("tokenizer", "gpt2"))
    block_size = model.config.block_size
    print(
        f"sample.py: checkpoint {args.ckpt}, step {state.get('step', '?')}, rope {rope_text}, "
        f"context {args.max_context or block_size} (trained at {block_size}), device {device}, "
        f"{dtype_name(dtype)}, tokenizer {tokenizer.name}",
        file=sys.stderr,
        flush=True,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print(SEPARATOR, flush=True)
        warn = (lambda m: print(f"warning: {m}", file=sys.stderr)) if i == 0 else None
        generate_text(
            model, tokenizer, prompt, args, generator, partial(print, end="", flush=True), warn
        )
        print(flush=True)


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")  # the model's text is UTF-8, whatever the locale says
    try:
        sys.exit(flags.cli(main))
    except BrokenPipeError:  # `python sample.py ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
