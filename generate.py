"""Decoding with the KV cache, apart from the model as in gpt-fast: the prefill, the decoding step
(static shapes: torch.compile makes one graph of it), a dynamic variant's l', and sampling.

A dynamic variant scales for l' (Dynamic YaRN: s = max(1, l'/L), paper Sec. 3.3), which cached
keys cannot follow (deeper layers' keys come from the old scale's states). Two exact rules:
  follow    (default) l' is the length so far rounded up to L 2^k, the prefix prefilled again each
            time it steps: every token equals a full forward pass of its prefix at that l'.
  capacity  l' is prompt + new tokens: one prefill, but a short prompt runs at the larger scale.
"""

import functools

import torch
import torch.nn.functional as F

from model import KVCache, Transformer
from rope import RopeConfig

RULES = ("follow", "capacity")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sampler(temperature: float = 1.0, top_k: int | None = None, generator=None, vocab_limit=None):
    """choose(logits (B, V)) -> tokens (B,): the argmax at temperature 0, else drawn from
    softmax(logits / temperature) over the top k, below vocab_limit."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")

    def choose(logits):
        logits = logits[:, :vocab_limit]
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)

    return choose


def rope_seq_len(cfg: RopeConfig, n: int, max_len: int, rule: str = "follow") -> int:
    """The l' for a sequence of n of its max_len tokens under `rule` (static variants: max_len)."""
    if rule not in RULES:
        raise ValueError(f"rope rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "capacity" or not cfg.is_dynamic:
        return max_len
    seq_len = cfg.original_context
    while seq_len < n:
        seq_len *= 2
    return seq_len


def prefill(model: Transformer, prefix: torch.Tensor, cache: KVCache, seq_len: int) -> torch.Tensor:
    """Fill the cache with prefix (B, n) at l' = seq_len: its last logits."""
    cache.pos, cache.seq_len = 0, seq_len
    return model(prefix, cache=cache, last_n=1)[:, -1]


def decode_step(model: Transformer, token, pos, cos, sin, cache: KVCache) -> torch.Tensor:
    """The logits (B, V) after a token (B, 1) at pos (a tensor (1,)), with static shapes: it attends
    to the whole cache, masked past pos; cos, sin: the tables (max_len, |D|)."""
    x, mask = model.embed(token, pos, cache), cache.mask(pos)  # (B, 1, d), (1, max_len)
    cos, sin = cos[pos], sin[pos]  # (1, |D|): the tables' rows at pos
    for block in model.blocks:
        x = block(x, cos, sin, mask, cache, pos)
    return model.lm_head(model.norm(x))[:, -1]


@functools.cache
def compiled_step(device_type: str):
    """decode_step compiled once per process, one graph for all generations of its shapes: CUDA
    graphs on CUDA, inductor with cpp_wrapper on CPUs (1.35x, PERF_NOTES)."""
    if device_type == "cuda":
        return torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    choose=greedy,
    rule: str = "follow",
    compile: bool = False,
    stop_token: int | None = None,
):
    """Yield the new tokens (B,), each choose(logits (B, V)), until all rows drew stop_token. The
    prefix is prefilled first and when the rule's l' changes; other tokens are one step each."""
    B, P = prompt.shape
    max_len = P + max_new_tokens
    no_autograd = torch.no_grad if compile else torch.inference_mode  # CUDA graphs need no_grad
    with no_autograd():
        cache = model.new_cache(B, max_len)
    if compile:
        step = compiled_step(prompt.device.type)
        for t in (*cache.k, *cache.v, cache.tokens):  # CUDA graphs write to fixed addresses
            torch._dynamo.mark_static_address(t)  # no guard: a new cache reuses the graph
    seq = torch.cat((prompt, prompt.new_empty(B, max_new_tokens)), dim=1)  # (B, max_len)
    for n in range(P, max_len):
        seq_len = rope_seq_len(model.config.rope, n, max_len, rule)
        with no_autograd():  # the chosen tokens stay plain tensors
            if n == P or seq_len != cache.seq_len:
                cos, sin = model.rotary(0, max_len, seq_len)  # all positions' tables at this l'
                logits = prefill(model, seq[:, :n], cache, seq_len)
            elif compile:
                pos = torch.tensor([n - 1], device=prompt.device)
                logits = step(model, seq[:, n - 1 : n], pos, cos, sin, cache)
            else:
                logits = model(seq[:, n - 1 : n], cache=cache)[:, -1]
        token = choose(logits)
        seq[:, n] = token
        yield token
        if stop_token is not None and bool((token == stop_token).all()):
            return
