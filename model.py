"""A LLaMA-style decoder: the token embedding tied to the output head; pre-norm blocks of RMSNorm ->
causal self-attention (SDPA, optional grouped-query heads) and RMSNorm -> SwiGLU MLP; the RoPE
tables and a KV cache (decoding is generate.py's). set_rope swaps the RoPE variant of a built model,
weights untouched: a model pretrained at context L is extended to L' = s L.
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import flags
import rope
from loss import chunked_cross_entropy
from prev_tokens import PreviousTokens
from rope import RopeConfig


# Config
@dataclass(frozen=True)
class ModelConfig:
    """The architecture and its RoPE, stored in each checkpoint:
    vocab_size      e.g. GPT-2's 50257 padded to a multiple of 64
    n_layer         transformer blocks
    n_head          query heads per layer (head_dim = d_model / n_head)
    n_kv_head       0 = n_head; fewer: grouped-query attention
    d_model         the residual stream's width
    ffn_hidden      0 = LLaMA's 8/3 d_model, rounded up to a multiple of 64
    block_size      the context the model trains at
    norm_eps        RMSNorm's epsilon
    prev_tokens     K > 0: each position also embeds the K tokens before it (prev_tokens.py)
    qkv_bias        biases on W_q, W_k, W_v (Qwen2 has them)
    tie_embeddings  the output head is the token embedding (False: its own matrix)
    """

    vocab_size: int = 50304
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 0
    d_model: int = 512
    ffn_hidden: int = 0
    block_size: int = 512
    norm_eps: float = 1e-5
    prev_tokens: int = 0
    qkv_bias: bool = False
    tie_embeddings: bool = True
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        flags.check_types(self)  # ints, bools, a float and a RopeConfig, or a ValueError
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "block_size"):
            if not 1 <= getattr(self, name) <= 2**31:
                raise ValueError(f"--{name} must be in [1, 2^31], got {getattr(self, name)}")
        for name in ("n_kv_head", "ffn_hidden", "prev_tokens"):  # 0 = the default
            if not 0 <= getattr(self, name) <= 2**31:
                raise ValueError(f"--{name} must be in [0, 2^31], got {getattr(self, name)}")
        d, h, kv = self.d_model, self.n_head, self.kv_heads
        if d % h or h % kv:
            raise ValueError(f"model n_head {h} must divide d_model {d}, and n_kv_head {kv} n_head")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"model norm_eps must be in (0, 1), got {self.norm_eps}")
        rope.rotary_dim(self.head_dim, self.rope)  # raises for an odd rotary dim

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
        """The config to_dict wrote; a ValueError naming unknown keys."""
        rope_dict = d.get("rope", {}) if isinstance(d, dict) else None
        for given, kind in ((d, cls), (rope_dict, RopeConfig)):
            if not isinstance(given, dict):
                raise ValueError(f"a {kind.__name__} must be a dict, got {type(given).__name__}")
            if unknown := set(given) - {f.name for f in fields(kind)}:
                raise ValueError(f"unknown {kind.__name__} keys {sorted(unknown)}")
        return cls(**{**d, "rope": RopeConfig(**rope_dict)})


# What a forward pass reads besides the weights: the RoPE tables and a KV cache
class Rotary(nn.Module):
    """A RoPE variant's fp32 cos/sin tables by position, grown on demand (a dynamic variant's
    rebuilt for each new l')."""

    def __init__(self, head_dim: int, cfg: RopeConfig, n_positions: int):
        super().__init__()
        self.head_dim, self.cfg = head_dim, cfg
        self.dynamic = cfg.is_dynamic  # a bool: torch.compile guards on it, not on the name
        self.seq_len = None  # the l' of a dynamic variant's tables
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if not self.dynamic:
            self.build(n_positions)

    def build(self, n_positions: int, seq_len: int | None = None, device=None):
        with torch.inference_mode(False):  # plain tensors, even when decoding
            inv_freq, attention_factor = rope.frequencies(self.head_dim, self.cfg, seq_len)
            positions = torch.arange(n_positions, device=device, dtype=torch.float64)
            self.cos, self.sin = rope.cos_sin_table(inv_freq, attention_factor, positions)
        self.seq_len = seq_len

    def forward(self, start: int, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + n
        if self.dynamic and (seq_len != self.seq_len or end > len(self.cos)):  # a new l', a new s
            self.build(max(seq_len, end), seq_len, self.cos.device)
        elif end > len(self.cos):
            self.build(max(end, 2 * len(self.cos)), device=self.cos.device)
        return self.cos[start:end], self.sin[start:end]

    def _apply(self, fn, recurse=True):
        """model.to() and .half() run this: the tables move, but stay fp32."""
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.build(len(self.cos), self.seq_len, self.cos.device)
        return self


class KVCache:
    """Each layer's rotated keys and values (B, n_kv_head, max_len, head_dim), `pos` filled at
    l' = seq_len."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # for hooks
        self.max_len = self.seq_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Write k, v (B, H_kv, T, hd) at start.. and return those to attend to: the filled part
        for an int start; for a tensor (decode_step's) the whole cache, which its mask hides."""
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, max_len), True = attend: a query at position p sees the keys 0..p."""
        return torch.arange(self.max_len, device=positions.device) <= positions[:, None]


# The model
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # W_q, W_k, W_v stacked: H query heads, H_kv key heads, H_kv value heads
        qkv = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.d_model, qkv, bias=config.qkv_bias)
        self.qkv_bias = config.qkv_bias
        self.wo = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start=0):
        # functional calls, not module calls: decoding is Python-bound
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = F.linear(x, self.wqkv.weight, self.wqkv.bias if self.qkv_bias else None)
        qkv = qkv.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H + 2 H_kv, T, hd)
        qk = rope.apply_rope(qkv[:, : H + H_kv], cos, sin)  # queries and keys rotated at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv :]  # H, H_kv, H_kv heads
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)  # (B, H_kv, positions so far, hd)
        causal, gqa = mask is None and T > 1, H_kv != H
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        # y (B, H, T, hd) = softmax(q k^T / sqrt(hd)) v, YaRN's 1/t already inside q and k
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.wo.weight)  # (B, T, d)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), as in LLaMA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.d_model, 2 * config.hidden_dim, bias=False)  # w1, w3 stacked
        self.w2 = nn.Linear(config.hidden_dim, config.d_model, bias=False)

    def forward(self, x):
        gate, up = F.linear(x, self.w13.weight).chunk(2, dim=-1)  # (B, T, hidden) each
        return F.linear(F.silu(gate) * up, self.w2.weight)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        x = x + self.attn(rms_norm(self.attn_norm, x), cos, sin, mask, cache, start)
        return x + self.mlp(rms_norm(self.mlp_norm, x))


def rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x), a Python call fewer."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


class Transformer(nn.Module):
    # a loss over more logits than this runs chunk by chunk (loss.py)
    loss_chunk_threshold: int = 2**30
    loss_chunk_elements: int = 2**27  # logits per chunk: 512 MB in fp32
    checkpoint_blocks: bool = False  # training keeps only each block's input; recomputes the rest

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.prev_emb = None  # the hook of prev_tokens.py
        if config.prev_tokens:
            self.prev_emb = PreviousTokens(config.prev_tokens, config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # tied
        self.rotary = Rotary(config.head_dim, config.rope, config.block_size)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 n_layer): the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_rope(self, cfg: RopeConfig, block_size: int | None = None):
        """Swap the RoPE variant (and training context), not the weights."""
        block_size = block_size or self.config.block_size
        self.config = replace(self.config, rope=cfg, block_size=block_size)
        device = next(self.parameters()).device
        self.rotary = Rotary(self.config.head_dim, cfg, self.config.block_size).to(device)

    def forward(self, idx, targets=None, cache=None, seq_len=None, last_n=None):
        """idx (B, T) -> logits (B, T, vocab), or with targets the mean cross-entropy (-1 ignored).
        With a cache, idx continues its sequence. seq_len: l' (default the cache's, else the
        sequence's). last_n: the head runs on the last n positions."""
        B, T = idx.shape
        if last_n is not None and not 1 <= last_n <= T:
            raise ValueError(f"last_n must be in [1, {T}] (the tokens given), got {last_n}")
        start = 0
        if cache is not None:
            start, seq_len = cache.pos, seq_len or cache.seq_len
            if start + T > cache.max_len:
                raise ValueError(
                    f"KV cache holds {cache.max_len} positions, {start} used; {T} more do not fit"
                )
        cos, sin = self.rotary(start, T, seq_len or start + T)
        x = self.embed(idx, start, cache)
        mask = None  # is_causal does it; a single query sees every key so far
        if start and T > 1:
            mask = cache.mask(torch.arange(start, start + T, device=idx.device))[:, : start + T]
        for block in self.blocks:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, start)
        if cache is not None:
            cache.pos = start + T
        if last_n is not None:
            x = x[:, -last_n:]  # (B, n, d)
            targets = None if targets is None else targets[:, -last_n:]
        x = rms_norm(self.norm, x)
        n_logits = B * x.shape[1] * self.config.vocab_size
        if targets is not None and n_logits > self.loss_chunk_threshold:
            return chunked_cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_elements)
        logits = F.linear(x, self.lm_head.weight)  # (B, T, V)
        if targets is None:
            return logits
        logits = logits.float().view(-1, logits.size(-1))
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)

    def embed(self, idx: torch.Tensor, start, cache: KVCache | None = None) -> torch.Tensor:
        """The embeddings (B, T, d), and the CPU preset's hook: previous-token embeddings."""
        x = F.embedding(idx, self.tok_emb.weight)
        return x if self.prev_emb is None else x + self.prev_emb(idx, start, cache)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied head counted once

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token at context T: 6N for the matmuls of N parameters (the tied
        embedding once) plus causal attention, 6 n_layer d_model T (PaLM App. B, halved)."""
        c = self.config
        lookups = self.prev_emb.weight.numel() if self.prev_emb is not None else 0  # not matmuls
        return 6 * (self.num_params() - lookups) + 6 * c.n_layer * c.n_head * c.head_dim * T
