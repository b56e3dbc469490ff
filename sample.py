"""
Sample from a trained checkpoint, streaming the text as it is generated.

    python sample.py --ckpt out/pretrain --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/pretrain --prompt_file long.txt --max_context 4096 \\
        --rope.type=dynamic_yarn                    # Dynamic YaRN on a model never fine-tuned (paper Sec. 3.3)

The model is rebuilt from the checkpoint alone (its model config holds the RoPE variant), decodes with the KV
cache (Transformer.generate) and prints only the new text to stdout, as UTF-8; a header line and any warnings go
to stderr. The prompt comes from --prompt, --prompt_file (UTF-8), or neither: then generation starts from the
end-of-text token (EOT), i.e. at the start of a document. Generation stops at EOT unless --no-stop_at_eot.

Context policy. P = prompt tokens, N = --max_new_tokens, C = the context: the checkpoint's block_size (the
context it was trained at: L for a pretrained model, s*L for one fine-tuned with YaRN at scale s) unless
--max_context says otherwise. The whole sequence, prompt and new tokens, must fit: P + N <= C.
  1. P + N <= C: generate as asked.
  2. --truncate_prompt and P + N > C: keep the last max(C - N, 1) prompt tokens (a sliding window: the C-token
     window ends at the last new token), with a warning saying how many were dropped.
  3. P >= C (no room for even one new token): an error giving both lengths and the two ways out,
     --truncate_prompt, or --max_context to run longer sequences knowingly.
  4. P < C but P + N > C: N is lowered to C - P, with a warning. max_new_tokens is an upper bound anyway
     (generation may stop earlier at EOT); the prompt is what was asked about, so it is kept whole.
--max_context may exceed block_size: the model runs at any length (its RoPE tables grow), but positions past
the trained context were never trained, so quality there is not guaranteed (a warning says so). Dynamic
variants (--rope.type=dynamic or dynamic_yarn) are made for this: their scale is s = max(factor, l'/L) with
l' = P + N, the length the KV cache is built for (see model.py), fixed for the whole generation.

RoPE override. --rope.<field>=<value> for any RopeConfig field (--rope.type, --rope.factor, --rope.beta_fast, ...)
replaces that field of the checkpoint's RoPE config, and the model's tables are rebuilt with model.set_rope before
generating; the weights are untouched. --rope.original_context (L) defaults to the checkpoint's, or, where that
has none (a plain RoPE model), to its block_size: the context a model without scaling was pretrained at.

Numbers: --dtype auto is bfloat16 on a CUDA GPU that supports it (the model is cast; the RoPE tables stay fp32)
and float32 otherwise. --seed seeds a torch.Generator used only for sampling, so the same seed, checkpoint, prompt
and device give the same text; temperature 0 is greedy (argmax) and needs no seed.
"""

import argparse
import codecs
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

import checkpoint
import flags
from model import rope_with_overrides
from data.tokenizer import EOT, VOCAB_SIZE, get_tokenizer
from rope import RopeConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEPARATOR = "---------------"  # printed between samples, as nanoGPT does

# ----------------------------------------------------------------------------------------------------------
# Prompt and context policy (the module docstring states it; fit_context implements it)


class ContextError(ValueError):
    """The prompt does not fit the context; the message gives the lengths and the ways out."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt is [EOT], the start of a document.
    encode_ordinary, as data/prepare.py does: a literal "<|endoftext|>" in the text is text, not the special token."""
    return tokenizer.encode_ordinary(prompt) if prompt else [EOT]


def fit_context(n_prompt: int, max_new_tokens: int, context: int, truncate_prompt: bool = False,
                block_size: int | None = None) -> tuple[int, int, list[str]]:
    """Apply the context policy to a prompt of n_prompt tokens: (prompt tokens to keep, from its end; new tokens to
    generate; warnings). Raises ContextError when the prompt leaves no room for a new token."""
    warnings = []
    keep = n_prompt
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
            "is not guaranteed (dynamic variants such as --rope.type=dynamic_yarn are made for this)"
        )
    if keep + max_new_tokens > context:
        warnings.append(f"max_new_tokens lowered from {max_new_tokens} to {context - keep}: prompt ({keep} tokens) + "
                        f"max_new_tokens must fit the context of {context} (--max_context allows more)")
        max_new_tokens = context - keep
    if block_size is not None and keep + max_new_tokens > block_size:
        warnings.append(f"the sequence (up to {keep + max_new_tokens} tokens) runs past the context the model was "
                        f"trained at ({block_size}); quality there is not guaranteed")
    return keep, max_new_tokens, warnings


# ----------------------------------------------------------------------------------------------------------
# Streaming decode


class StreamDecoder:
    """Token ids in, complete characters out.

    GPT-2's BPE works on bytes and often splits a multi-byte UTF-8 character across tokens ("日" is three bytes,
    and can be two tokens), so decoding each token on its own would print U+FFFD for each piece. Instead the
    tokens' bytes (tiktoken's decode_bytes) go through Python's incremental UTF-8 decoder, which returns every
    complete character and holds back an incomplete tail until the bytes that finish it arrive. Bytes that can
    never be valid UTF-8 become U+FFFD, so the pieces joined equal bytes.decode("utf-8", errors="replace") of the
    whole output. Ids the tokenizer does not know (the padding rows of the model's vocabulary, 50257 and up) are
    shown as U+FFFD too."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token: int) -> bytes:
        if 0 <= token < self.tokenizer.n_vocab:
            return self.tokenizer.decode_bytes([token])
        return "\ufffd".encode("utf-8")

    def push(self, tokens) -> str:
        """The characters that the new tokens complete (possibly "")."""
        return self.utf8.decode(b"".join(self.token_bytes(t) for t in tokens))

    def flush(self) -> str:
        """At the end: an incomplete tail still held back becomes U+FFFD."""
        return self.utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------------------
# Generation


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Raise a ValueError naming the bad setting."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not 0 <= temperature < math.inf:  # also catches nan
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, or none for no limit, got {top_k!r}")


def generate_tokens(model, tokens: list[int], max_new_tokens: int, temperature: float = 0.8,
                    top_k: int | None = 200, generator: torch.Generator | None = None, stop_token: int | None = None,
                    vocab_limit: int = VOCAB_SIZE):
    """Yield new token ids one at a time, decoding with the KV cache (model.generate). The stop token, if drawn,
    is yielded last. For dynamic RoPE variants the scale is fixed by len(tokens) + max_new_tokens. Only ids below
    vocab_limit (the tokenizer's vocabulary; the embedding is padded past it) are drawn."""
    idx = torch.tensor([tokens], dtype=torch.long, device=model.tok_emb.weight.device)  # (1, P)
    for token in model.generate(idx, max_new_tokens, temperature, top_k, stop_token, generator,
                                vocab_limit=vocab_limit):  # token: (1,)
        yield int(token[0])


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
                  top_k: int | None = 200, generator: torch.Generator | None = None, stop_at_eot: bool = True,
                  max_context: int | None = None, truncate_prompt: bool = False, on_text=None,
                  on_warning=None) -> str:
    """The text generated after `prompt` (the prompt itself not included; EOT, when it stops generation, not
    included). The context policy of the module docstring applies with context = max_context or the model's
    block_size. on_text(piece) is called with each run of complete characters as soon as it is decoded (streaming);
    on_warning(message) with each warning of the context policy."""
    check_sampling(max_new_tokens, temperature, top_k)
    block_size = model.config.block_size
    context = block_size if max_context is None else max_context
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"max_context must be an int >= 1, got {max_context!r}")
    tokens = encode_prompt(tokenizer, prompt)
    if max(tokens) >= model.config.vocab_size:
        raise ValueError(f"the prompt has token id {max(tokens)}, outside the model's vocabulary of "
                         f"{model.config.vocab_size}; this checkpoint was not trained with this tokenizer")
    keep, max_new_tokens, warnings = fit_context(len(tokens), max_new_tokens, context, truncate_prompt, block_size)
    for message in warnings:
        if on_warning is not None:
            on_warning(message)
    tokens = tokens[len(tokens) - keep :]

    decoder, pieces = StreamDecoder(tokenizer), []

    def emit(piece: str):
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    stop_token = EOT if stop_at_eot else None
    for token in generate_tokens(model, tokens, max_new_tokens, temperature, top_k, generator, stop_token):
        if token == stop_token:
            break
        emit(decoder.push([token]))
    emit(decoder.flush())
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------
# RoPE override


def rope_summary(cfg: RopeConfig) -> str:
    """'yarn (factor=4.0, original_context=512)': the type and every field that differs from the defaults."""
    default = RopeConfig()
    changed = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
               if f.name != "type" and getattr(cfg, f.name) != getattr(default, f.name)]
    return cfg.type + (f" ({', '.join(changed)})" if changed else "")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_top_k(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or none, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python sample.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample from a checkpoint, streaming text to stdout (header and warnings to stderr).",
        epilog="Context policy (P prompt tokens, N max_new_tokens, C context = --max_context or the checkpoint's "
               "block_size; P + N must fit C):\n"
               "  P >= C                  error, unless --truncate_prompt or a larger --max_context\n"
               "  P < C < P + N           N lowered to C - P, with a warning\n"
               "  --truncate_prompt       keep the last max(C - N, 1) prompt tokens (sliding window)\n"
               "  --max_context > block_size runs past the trained context knowingly; quality not guaranteed.\n"
               "RoPE override: --rope.<field>=<value> for any RopeConfig field, e.g. --rope.type=dynamic_yarn "
               "--rope.factor=1;\n"
               "  --rope.original_context defaults to the checkpoint's, else its block_size.\n"
               "Exit status 2 for any invalid input (checkpoint, prompt, settings), with a message on stderr.",
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint file, or a run folder holding ckpt.pt")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="the prompt text (default: none, start from EOT)")
    source.add_argument("--prompt_file", default=None, help="read the prompt from this UTF-8 text file")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top_k", type=parse_top_k, default=200,
                        help="sample among the k most likely tokens, an int >= 1, or none (default 200)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (default 1337)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to draw, one after another (default 1)")
    parser.add_argument("--stop_at_eot", action=argparse.BooleanOptionalAction, default=True,
                        help="stop a sample at the end-of-text token (default: on)")
    parser.add_argument("--max_context", type=int, default=None,
                        help="longest sequence, prompt + new tokens, to allow (default: the checkpoint's block_size)")
    parser.add_argument("--truncate_prompt", action="store_true",
                        help="keep only the prompt's last tokens so that it and max_new_tokens fit the context")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto (default) = bf16 on a CUDA GPU that supports it, else fp32")
    rope_group = parser.add_argument_group("RoPE override", "replace fields of the checkpoint's RoPE config")
    rope_types = flags.field_types(RopeConfig)
    for name, typ in rope_types.items():
        rope_group.add_argument(f"--rope.{name}", dest=f"rope.{name}", default=argparse.SUPPRESS,
                                metavar=name.upper(), help=f"(default: the checkpoint's {name})")
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # `--temperature=--` reaches here as [] (argparse's option terminator)
        if isinstance(value, list):
            raise ValueError(f"--{name} needs a value, got '--'")
    for name, typ in rope_types.items():  # typed here, not by argparse, so errors read as train.py's do
        key = f"rope.{name}"
        if hasattr(args, key):
            setattr(args, key, flags.parse_value(key, getattr(args, key), typ))
    return args


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        data = Path(args.prompt_file).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the prompt file {args.prompt_file}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt file {args.prompt_file} is not UTF-8 text: byte 0x{data[e.start]:02x} at "
                         f"offset {e.start} ({e.reason}); convert it, e.g. with iconv -t utf-8") from None


def pick_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cuda, cuda:1, cpu, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return DTYPES[name]


def write(text: str) -> None:
    print(text, end="", flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_k)
    for name in ("num_samples", "max_context"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    prompt = read_prompt(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    model, state = checkpoint.load_model(args.ckpt, device)
    rope_text = rope_summary(model.config.rope)
    overrides = {key[len("rope."):]: value for key, value in vars(args).items() if key.startswith("rope.")}
    if overrides:
        model.set_rope(rope_with_overrides(model.config, overrides))  # weights untouched
        rope_text += f", overridden to {rope_summary(model.config.rope)}"
    model.to(dtype)  # Rotary rebuilds its tables in fp32
    tokenizer = get_tokenizer()
    context = args.max_context or model.config.block_size
    print(f"sample.py: checkpoint {args.ckpt}, step {state.get('step', '?')}, rope {rope_text}, "
          f"context {context} (trained at {model.config.block_size}), device {device}, "
          f"{str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            write(SEPARATOR + "\n")
        generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, generator,
                      args.stop_at_eot, args.max_context, args.truncate_prompt, on_text=write,
                      on_warning=warn if i == 0 else None)
        write("\n")
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except BrokenPipeError:  # `python sample.py ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # CheckpointError, ContextError and RopeConfig's errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")  # the model's text is UTF-8, whatever the locale says
    sys.exit(main())
