"""Previous-token embeddings: the CPU preset's aid (reproduce.PRESETS "cpu" and "tiny"), neither
LLaMA's nor the paper's. Each position also embeds the K = prev_tokens tokens before it, the
"smeared" input of Olsson et al. 2022: the previous tokens that a copying circuit otherwise needs a
whole attention layer to gather, so that a small model learns to copy (and the retrieval probe has
something to find) in CPU minutes. model.Transformer.embed is the one hook, which a model without
prev_tokens never runs. The table is saved as prev_emb.weight; flops_per_token skips its lookups.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreviousTokens(nn.Embedding):
    """K tables of V rows, stacked (K V, d): the k-th token back (k = 1..K) reads row (k - 1) V +
    id; before the start of the sequence, id V - 1."""

    def __init__(self, K: int, vocab_size: int, d_model: int):
        super().__init__(K * vocab_size, d_model)
        self.K, self.V = K, vocab_size

    def forward(self, idx: torch.Tensor, start, cache=None) -> torch.Tensor:
        """The summed embeddings (B, T, d) of the K tokens before each of idx's positions start,
        start + 1, ... (start an int, or a tensor (1,)); with a KV cache, the tokens before idx are
        those it holds."""
        positions = start + torch.arange(idx.shape[1], device=idx.device)  # (T,)
        tokens = idx
        if cache is not None:
            cache.tokens.index_copy_(1, positions, idx)
            tokens = cache.tokens  # (B, max_len): every token so far, at its position
        back = positions[:, None] - torch.arange(1, self.K + 1, device=idx.device)  # (T, K)
        prev = torch.where(back >= 0, tokens[:, back.clamp(min=0)], self.V - 1)  # (B, T, K)
        rows = prev + self.V * torch.arange(self.K, device=idx.device)
        return F.embedding(rows, self.weight).sum(dim=2)
