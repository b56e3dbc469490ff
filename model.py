"""A GPT / LLaMA-style decoder in one file: token embedding tied to the output head; pre-norm blocks of RMSNorm ->
causal self-attention (F.scaled_dot_product_attention, optional grouped-query heads) and RMSNorm -> SwiGLU MLP;
a KV cache for decoding, preallocated: a decoding step (`step`) has static shapes, so it compiles to one graph.
The RoPE variant is any of rope.py's, swappable on a built model without touching its weights (`set_rope`): that
is how a model pretrained at context L is extended to s L.

Dynamic variants and the KV cache. A dynamic variant's frequencies depend on the length l' (`rope_length`, by
default the forward pass's own; Dynamic YaRN: s = max(1, l'/L), paper Sec. 3.3). Cached keys cannot follow a new
scale: deeper layers' keys come from hidden states computed under the old one, so even re-rotating pre-RoPE keys
(the paper's suggestion) is not exact. `decode` has two exact rules:
  follow    (default) l' is the length so far rounded up to L * 2^k (L while l' <= L); each time it steps, the whole
            prefix is prefilled again under the new scale. Every token equals a full forward pass of its prefix at
            that l', so a prompt shorter than L gets plain RoPE's logits.
  capacity  l' is prompt + new tokens throughout: one prefill, but a short prompt headed for a long generation
            runs at the larger scale from its first token.
"""

import functools
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import rope
from loss import chunked_cross_entropy
from rope import RopeConfig

ROPE_RULES = ("follow", "capacity")


# Config
@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    n_layer: int = 8  # transformer blocks
    n_head: int = 4  # query heads per layer (head_dim = d_model / n_head)
    n_kv_head: int = 0  # 0 = n_head (multi-head); fewer = grouped-query attention
    d_model: int = 512  # the residual stream's width
    ffn_hidden: int = 0  # 0 = the LLaMA rule: 8/3 d_model rounded up to a multiple of 64
    block_size: int = 512  # the context the model trains at; RoPE tables are prebuilt for it (and grow on demand)
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    prev_tokens: int = 0  # K > 0: each position also embeds the K tokens before it (optional; end of model.py)
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "block_size", "n_kv_head", "ffn_hidden",
                     "prev_tokens"):
            optional = name in ("n_kv_head", "ffn_hidden", "prev_tokens")  # 0 = the default
            value = getattr(self, name)
            if type(value) is not int or not (0 if optional else 1) <= value <= 2**31:
                kind = "an int in [0, 2^31] (0 = default)" if optional else "a positive int (at most 2^31)"
                raise ValueError(f"model {name} must be {kind}, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"model d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if not (isinstance(self.norm_eps, float) and 0 < self.norm_eps < 1):
            raise ValueError(f"model norm_eps must be a float in (0, 1), got {self.norm_eps!r}")
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"model rope must be a RopeConfig, got {type(self.rope).__name__}")
        rope.rotary_dim(self.head_dim, self.rope)  # raises if the rotary dim is odd

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.ffn_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config to_dict wrote (a checkpoint's or config file's); a ValueError naming unknown or bad keys."""
        if not isinstance(d, dict) or not isinstance(d.get("rope", {}), dict):
            raise ValueError(f"model config must be a dict whose 'rope' is a dict, got {type(d).__name__}")
        for given, kind in ((d, cls), (d.get("rope", {}), RopeConfig)):
            unknown = set(given) - {f.name for f in fields(kind)}
            if unknown:
                known = [f.name for f in fields(kind)]
                raise ValueError(f"unknown {kind.__name__} keys {sorted(unknown)}; known: {known}")
        return cls(**{**d, "rope": RopeConfig(**d.get("rope", {}))})


# What a forward pass reads besides the weights: the rotary tables, and when decoding the KV cache
class Rotary(nn.Module):
    """Cos/sin tables for one RoPE variant, fp32, built once and indexed by position: for a static variant
    prebuilt for `length` positions (and regrown for longer sequences), for a dynamic one built for each new l'."""

    def __init__(self, head_dim: int, cfg: RopeConfig, length: int):
        super().__init__()
        self.head_dim, self.cfg = head_dim, cfg
        self.dynamic = cfg.is_dynamic  # a plain bool, so torch.compile guards on it and not on the variant's name
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._dynamic_key = None
        if not self.dynamic:
            self._build(length, device=None)

    def _build(self, length: int, device, seq_len: int | None = None):
        with torch.inference_mode(False):  # ordinary tensors, even when decoding builds them: training may follow
            freqs, factor = rope.inv_freq(self.head_dim, self.cfg, seq_len)
            positions = torch.arange(length, device=device, dtype=torch.float64)
            self.cos, self.sin = rope.cos_sin_table(freqs, factor, positions)

    def forward(self, start: int, n: int, rope_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start+n-1 of a sequence of length l' = rope_length."""
        device = self.cos.device
        if self.dynamic:
            if self._dynamic_key != (rope_length, device) or start + n > self.cos.shape[0]:  # new l': new scale
                self._build(max(rope_length, start + n), device, seq_len=rope_length)
                self._dynamic_key = (rope_length, device)
        elif start + n > self.cos.shape[0]:
            self._build(max(start + n, 2 * self.cos.shape[0]), device)
        return self.cos[start : start + n], self.sin[start : start + n]

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) or .half() must not cast the tables: rebuild them in fp32 on the new device
        super()._apply(fn, *args, **kwargs)
        if self.cos.numel() and self.cos.dtype != torch.float32:
            self._build(self.cos.shape[0], self.cos.device)
            self._dynamic_key = None
        return self


class KVCache:
    """Rotated keys and values of every layer, (B, n_kv_head, max_len, head_dim), the tokens (for the previous-token
    embeddings), the positions filled, and the l' (rope_length) dynamic variants scale for (module docstring)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len = self.rope_length = max_len
        self.pos = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v (B, H_kv, T, hd) at positions (T,) and return the whole cache: its shapes never change, and the
        mask hides the positions not written yet."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, max_len), True = attend: a query at position p sees the keys at positions 0..p."""
        return torch.arange(self.max_len, device=positions.device) <= positions[:, None]


# The model
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # W_q, W_k and W_v stacked, one matmul: n_head heads of queries, then n_kv_head of keys and of values
        self.wqkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, positions=None):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H + 2 H_kv, T, hd)
        q, k, v = qkv.split((self.n_head, self.n_kv_head, self.n_kv_head), dim=1)  # (B, H, T, hd), (B, H_kv, T, hd)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, positions)  # (B, H_kv, max_len, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)
        # y (B, H, T, hd) = softmax(q k^T / sqrt(hd)) v, YaRN's 1/t already inside q and k
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H hd) -> (B, T, d)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), as in LLaMA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.d_model, 2 * config.hidden_dim, bias=False)  # w1 (gate) and w3 (up), stacked
        self.w2 = nn.Linear(config.hidden_dim, config.d_model, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask=None, cache=None, positions=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    # a loss whose logits would exceed loss_chunk_threshold elements runs chunk by chunk (loss.py); instance-settable
    loss_chunk_threshold: int = 2**30
    loss_chunk_elements: int = 2**27  # logits per chunk (rows = this // vocab): 512 MB in fp32

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # optional (the end of this file), prev_tokens = K: a table for each of the K tokens before a position, stacked
        self.prev_emb = nn.Embedding(config.prev_tokens * config.vocab_size, config.d_model) if config.prev_tokens \
            else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.rotary = Rotary(config.head_dim, config.rope, config.block_size)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 n_layer) so the residual stream's variance stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_rope(self, cfg: RopeConfig, block_size: int | None = None):
        """Swap the RoPE variant (and optionally the training context) of a built model; weights untouched."""
        self.config = replace(self.config, rope=cfg, block_size=block_size or self.config.block_size)
        device = next(self.parameters()).device
        self.rotary = Rotary(self.config.head_dim, cfg, self.config.block_size).to(device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                rope_length: int | None = None, last_n: int | None = None):
        """idx (B, T) token ids. Returns logits (B, T, vocab), or with targets the mean cross-entropy
        (targets of -1 are ignored). With a cache, idx continues the cached sequence and the cache advances.
        rope_length: the l' dynamic variants scale for; default the cache's, else this sequence's T.
        last_n: the head runs on the last n positions only: logits (B, n, vocab), or the loss of the last n
        targets (evaluation scores only the last tokens of a window; a prefill needs only last_n = 1)."""
        B, T = idx.shape
        if last_n is not None and not 1 <= last_n <= T:
            raise ValueError(f"last_n must be in [1, {T}] for a sequence of {T} tokens, got {last_n}")
        start = 0
        if cache is not None:
            start = cache.pos
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, {start} used; {T} more do not fit")
            rope_length = rope_length or cache.rope_length
        cos, sin = self.rotary(start, T, rope_length or start + T)
        positions = start + torch.arange(T, device=idx.device)  # (T,)
        x = self.embed(idx, cache, positions)
        mask = cache.mask(positions) if cache is not None else None  # None: is_causal does it
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, positions)
        if cache is not None:
            cache.pos = start + T
        if last_n is not None:
            x = x[:, -last_n:]  # (B, n, d)
            targets = None if targets is None else targets[:, -last_n:]
        x = self.norm(x)
        if targets is not None and B * x.shape[1] * self.config.vocab_size > self.loss_chunk_threshold:
            return chunked_cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_elements)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def step(self, idx: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache):
        """One decoding step with static shapes, so that torch.compile makes one graph serve a whole generation:
        idx (B, 1) at position pos (a tensor (1,)), cos and sin the tables (capacity, |D|) at the cache's l'; the
        attention reads the whole cache, masked past pos. Returns the logits (B, V)."""
        x, mask = self.embed(idx, cache, pos), cache.mask(pos)  # (B, 1, d), (1, max_len)
        cos, sin = cos[pos], sin[pos]  # (1, |D|): the tables' rows at pos
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, pos)
        return self.lm_head(self.norm(x))[:, -1]

    def embed(self, idx: torch.Tensor, cache: KVCache | None, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)  # (B, T, d)
        if self.prev_emb is not None:  # optional, a CPU-preset aid: previous-token embeddings (the end of this file)
            x = x + previous_token_embeddings(self, idx, cache, positions)
        return x

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def rope_length(self, n: int, capacity: int, rule: str = "follow") -> int:
        """The l' a dynamic variant scales for when the sequence holds n tokens, under a rule of the module
        docstring: 'capacity' -> capacity; 'follow' -> n rounded up to L * 2^k, and L while n <= L. Static variants
        do not read l': capacity, so decoding never re-prefills for them."""
        if rule not in ROPE_RULES:
            raise ValueError(f"rope rule must be one of {', '.join(ROPE_RULES)}, got {rule!r}")
        if rule == "capacity" or not self.config.rope.is_dynamic:
            return capacity
        length = self.config.rope.original_context
        while length < n:
            length *= 2
        return length

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, max_new_tokens: int, choose, rule: str = "follow", compile: bool = False):
        """Decoding with a KV cache: choose(last logits (B, V)) gives the next tokens (B,), yielded step by step. The
        whole prefix is (re)filled in, an ordinary forward pass, when the cache is empty or the rule's l' differs from
        its keys'; every other token is a `step`, through torch.compile with compile=True (`compiled_step`)."""
        B, P = idx.shape
        capacity = P + max_new_tokens
        step = compiled_step(idx.device.type) if compile else Transformer.step
        no_autograd = torch.no_grad if compile else torch.inference_mode  # eager: not even version counters; compiled:
        with no_autograd():  # plain tensors, as CUDA graphs record them (the cache never leaves this loop)
            cache = self.new_cache(B, capacity)
        for t in (*cache.k, *cache.v, cache.tokens) if compile else ():  # CUDA graphs write in place only at addresses
            torch._dynamo.mark_static_address(t)  # marked fixed (guard-free: a new cache of these shapes, no recompile)
        seq = torch.cat((idx, idx.new_empty(B, max_new_tokens)), dim=1)  # (B, capacity): the prompt, then new tokens
        for n in range(P, capacity):
            length = self.rope_length(n, capacity, rule)
            with no_autograd():  # the tokens chosen stay normal tensors
                if n == P or length != cache.rope_length:  # a (re-)prefill under the new scale
                    cos, sin = self.rotary(0, capacity, length)  # every position's tables at this l': step's inputs
                    cache.pos, cache.rope_length = 0, length
                    logits = self(seq[:, :n], cache=cache, last_n=1)[:, -1]
                else:
                    logits = step(self, token[:, None], torch.tensor([n - 1], device=idx.device), cos, sin, cache)
            token = choose(logits)
            seq[:, n] = token
            yield token

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 stop_token: int | None = None, generator: torch.Generator | None = None,
                 vocab_limit: int | None = None, rule: str = "follow", compile: bool = False):
        """Yield new tokens (B,) step by step (decode); temperature 0 = greedy; only ids below vocab_limit are drawn.
        Stops once every row has drawn stop_token (yielded last)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")

        def choose(logits):
            return sample_token(logits[:, :vocab_limit], temperature, top_k, generator)

        for token in self.decode(idx, max_new_tokens, choose, rule, compile):
            yield token
            if stop_token is not None and bool((token == stop_token).all()):
                return

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied head counted once

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token at context T: 6N for the matmuls of N parameters (the tied embedding once, as
        the head) plus causal attention, 6 n_layer d_model T (PaLM App. B, halved for the causal mask)."""
        c = self.config
        lookups = self.prev_emb.weight.numel() if self.prev_emb is not None else 0  # embeddings read, not multiplied
        return 6 * (self.num_params() - lookups) + 6 * c.n_layer * c.n_head * c.head_dim * T


@functools.cache
def compiled_step(device_type: str):
    """Transformer.step through torch.compile, made once per process so that one graph serves every generation of the
    same shapes (batch, capacity, dtype): the tables of a new l' are inputs, not a recompile. CUDA replays the graph
    with CUDA graphs; the CPU calls inductor's kernels from C++ (cpp_wrapper; PERF_NOTES: 1.35x a Python wrapper)."""
    if device_type == "cuda":
        return torch.compile(Transformer.step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(Transformer.step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def sample_token(logits, temperature: float, top_k: int | None, generator=None):
    """Draw one token per row from logits (B, V): greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# === Optional, a reader may skip it: previous-token embeddings (prev_tokens = K > 0), a CPU-preset aid, neither
# LLaMA's nor the paper's. Its table is Transformer.prev_emb, its tokens KVCache.tokens; it joins the core path in
# Transformer.embed, and a model with prev_tokens = 0 never runs it.
def previous_token_embeddings(model: Transformer, idx: torch.Tensor, cache: KVCache | None, positions):
    """The summed embeddings (B, T, d) of the K tokens before each position (the "smeared" input of Olsson et al.
    2022): the previous tokens a copying circuit otherwise needs a whole attention layer to gather, so a small model
    learns to copy in minutes. The k-th token back (k = 1..K) reads row (k - 1) V + id; before the start, id V - 1."""
    K, V = model.config.prev_tokens, model.config.vocab_size
    tokens = idx
    if cache is not None:
        cache.tokens.index_copy_(1, positions, idx)
        tokens = cache.tokens  # (B, max_len): every token so far, at its position
    back = positions[:, None] - torch.arange(1, K + 1, device=idx.device)  # (T, K): the positions k = 1..K back
    prev = torch.where(back >= 0, tokens[:, back.clamp(min=0)], V - 1)  # (B, T, K)
    return F.embedding(prev + V * torch.arange(K, device=idx.device), model.prev_emb.weight).sum(dim=2)
