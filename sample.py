"""Sample from a trained checkpoint, streaming the text as it is generated.

    python sample.py --ckpt out/pretrain --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/pretrain --prompt_file long.txt --max_context 4096 --rope.type=dynamic_yarn

The model and its tokenizer come from the checkpoint; model.generate decodes with the KV cache (--compile: its step
compiled, one graph for the whole generation; model.compiled_step); the new text goes to stdout (UTF-8), a header and
warnings to stderr. No prompt starts a document; end-of-text stops a sample unless --stop_at_eot=false.
--rope.<field>=<value> replaces that field of the checkpoint's RoPE config (weights untouched;
checkpoint.rope_with_overrides), --rope_rule is model.py's. The context policy is fit_context's.
"""

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import checkpoint
import flags
from checkpoint import parse_rope_swap, rope_with_overrides
from data.tokenizer import StreamDecoder, get_tokenizer
from model import ROPE_RULES
from rope import RopeConfig
from system import dtype_name, pick_device, pick_dtype

SEPARATOR = "---------------"  # printed between samples, as nanoGPT does


@dataclass(frozen=True)
class SampleConfig:
    ckpt: str  # a checkpoint file, or a run folder holding ckpt.pt
    prompt: str = ""  # the prompt text; empty: start from end-of-text
    prompt_file: str | None = None  # read the prompt from this UTF-8 file instead
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 200  # sample among the k most likely tokens; none = no limit
    seed: int = 1337
    num_samples: int = 1
    stop_at_eot: bool = True
    max_context: int | None = None  # longest prompt + new tokens; default the checkpoint's block_size
    truncate_prompt: bool = False
    rope_rule: str = "follow"  # how a dynamic variant's l' is set while decoding (model.py)
    compile: bool = False  # torch.compile the decoding step: repaid after thousands of new tokens (README, Speed)
    device: str = "auto"
    dtype: str = "auto"  # float32, bfloat16; auto = bfloat16 on CUDA, float32 elsewhere

    def __post_init__(self):
        flags.check_types(self)
        checks = [(self.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {self.temperature}"),
                  (not (self.prompt and self.prompt_file is not None), "give --prompt or --prompt_file, not both"),
                  (self.rope_rule in ROPE_RULES, f"--rope_rule must be one of {', '.join(ROPE_RULES)}, got "
                                                 f"{self.rope_rule!r}")]
        checks += [(getattr(self, name) is None or getattr(self, name) >= 1, f"--{name} must be >= 1, got "
                    f"{getattr(self, name)}") for name in ("max_new_tokens", "top_k", "num_samples", "max_context")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class ContextError(ValueError):
    """The prompt does not fit the context; the message gives the lengths and the ways out."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt (a literal "<|endoftext|>" in it is text); an empty prompt is [end-of-text]."""
    return tokenizer.encode_ordinary(prompt) if prompt else [tokenizer.eot_token]


def fit_context(n_prompt: int, max_new_tokens: int, context: int, truncate_prompt: bool = False,
                block_size: int | None = None) -> tuple[int, int, list[str]]:
    """The context policy, for P prompt tokens, N new tokens and a context of C (--max_context or block_size):
      P + N <= C         generate as asked
      P < C < P + N      N is lowered to C - P, with a warning
      P >= C             ContextError, naming the lengths and the ways out:
      --truncate_prompt  keep the last max(C - N, 1) prompt tokens (a sliding window), with a warning
      --max_context      run past the trained context knowingly, with a warning.
    Returns (prompt tokens to keep, from its end; new tokens to generate; warnings)."""
    warnings, keep = [], n_prompt
    if truncate_prompt and keep + max_new_tokens > context and keep > 1:
        keep = max(context - max_new_tokens, 1)
        warnings.append(f"--truncate_prompt: kept the last {keep} of the prompt's {n_prompt} tokens, so that "
                        f"prompt + max_new_tokens fits the context of {context}")
    if keep >= context:
        raise ContextError(
            f"the prompt is {n_prompt} tokens, too long for the context of {context} tokens (it must leave room for "
            f"at least one new token: prompt + max_new_tokens <= context). Either pass --truncate_prompt to keep "
            f"the prompt's last tokens, or --max_context N (e.g. N = {n_prompt + max_new_tokens}) to allow longer "
            "sequences knowingly: the model runs at any length, but quality beyond the context it was trained at "
            "is not guaranteed (dynamic variants such as --rope.type=dynamic_yarn are made for this)")
    if keep + max_new_tokens > context:
        warnings.append(f"max_new_tokens lowered from {max_new_tokens} to {context - keep}: prompt ({keep} tokens) + "
                        f"max_new_tokens must fit the context of {context} (--max_context allows more)")
        max_new_tokens = context - keep
    if block_size is not None and keep + max_new_tokens > block_size:
        warnings.append(f"the sequence (up to {keep + max_new_tokens} tokens) runs past the context the model was "
                        f"trained at ({block_size}); quality there is not guaranteed")
    return keep, max_new_tokens, warnings


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
                  top_k: int | None = 200, generator=None, stop_at_eot: bool = True, max_context: int | None = None,
                  truncate_prompt: bool = False, on_text=None, on_warning=None, rule: str = "follow",
                  compile: bool = False) -> str:
    """The text generated after `prompt` under the context policy, without the prompt or a final end-of-text.
    on_text(piece) gets each run of complete characters as soon as it is decoded; on_warning(message) each
    warning of the context policy."""
    tokens = encode_prompt(tokenizer, prompt)
    if max(tokens) >= model.config.vocab_size:
        raise ValueError(f"the prompt has token id {max(tokens)}, outside the model's vocabulary of "
                         f"{model.config.vocab_size}; this checkpoint was not trained with this tokenizer")
    context = max_context or model.config.block_size
    keep, max_new_tokens, warnings = fit_context(len(tokens), max_new_tokens, context, truncate_prompt,
                                                 model.config.block_size)
    for message in warnings:
        if on_warning is not None:
            on_warning(message)
    decoder, pieces = StreamDecoder(tokenizer), []

    def emit(piece: str):
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    stop = tokenizer.eot_token if stop_at_eot else None
    idx = torch.tensor([tokens[len(tokens) - keep:]], device=model.tok_emb.weight.device)  # (1, P)
    for token in model.generate(idx, max_new_tokens, temperature, top_k, stop, generator, tokenizer.n_vocab, rule,
                                compile):
        if int(token[0]) != stop:
            emit(decoder.push([int(token[0])]))
    emit(decoder.flush())
    return "".join(pieces)


def rope_summary(cfg: RopeConfig) -> str:
    """'yarn (factor=4.0, original_context=512)': the type and the fields that differ from the defaults."""
    changed = [f"{k}={v}" for k, v in asdict(cfg).items() if k != "type" and v != getattr(RopeConfig(), k)]
    return cfg.type + (f" ({', '.join(changed)})" if changed else "")


def read_prompt(args: SampleConfig) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the prompt file {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt file {args.prompt_file} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start} ({e.reason}); convert it, e.g. with iconv -t utf-8") from None


def main(argv) -> None:
    args, overrides = parse_rope_swap(argv, SampleConfig, "python sample.py", __doc__)
    prompt, device = read_prompt(args), pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, state = checkpoint.load_model(args.ckpt, device)
    rope_text = rope_summary(model.config.rope)
    if overrides:
        model.set_rope(rope_with_overrides(model.config, overrides))  # weights untouched
        rope_text += f", overridden to {rope_summary(model.config.rope)}"
    model.to(dtype)  # the RoPE tables stay fp32
    tokenizer = get_tokenizer(state.get("tokenizer", "gpt2"))
    print(f"sample.py: checkpoint {args.ckpt}, step {state.get('step', '?')}, rope {rope_text}, context "
          f"{args.max_context or model.config.block_size} (trained at {model.config.block_size}), device {device}, "
          f"{dtype_name(dtype)}, tokenizer {tokenizer.name}", file=sys.stderr, flush=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print(SEPARATOR, flush=True)
        generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, generator,
                      args.stop_at_eot, args.max_context, args.truncate_prompt,
                      on_text=lambda piece: print(piece, end="", flush=True),
                      on_warning=(lambda m: print(f"warning: {m}", file=sys.stderr)) if i == 0 else None,
                      rule=args.rope_rule, compile=args.compile)
        print(flush=True)


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")  # the model's text is UTF-8, whatever the locale says
    try:
        sys.exit(flags.cli(main))
    except BrokenPipeError:  # `python sample.py ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
