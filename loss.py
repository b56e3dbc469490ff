"""The output head and the cross-entropy loss computed chunk by chunk of rows, so that the full
(tokens, vocab) logits never exist: at T = 32768 and a 50k vocabulary they would be 1.6G elements,
3.3 GB in bf16 plus 6.6 GB for the fp32 copy the loss reads. model.Transformer uses it for a loss
above its loss_chunk_threshold.
"""

import torch
import torch.nn.functional as F


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ W^T over the rows with a target (target -1 = ignored),
    computed chunk by chunk of rows. Each chunk's gradients are formed while its logits exist, so
    the full (N, vocab) logits never exist and nothing is recomputed in the backward pass: the same
    three matmuls as the unchunked path, in the same dtypes (under autocast: bf16 logits, loss math
    in fp32), and the same ops for d loss / d logits (the backward functions of log_softmax and
    nll_loss's mean that F.cross_entropy's autograd calls), so both paths round alike."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int):
        # h (N, d), weight (V, d), targets (N,) int
        total_weight = (targets != -1).sum().float()  # what nll_loss's mean divides by
        one = torch.ones((), device=h.device, dtype=torch.float32)
        loss_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(
            weight.shape,
            device=weight.device,
            dtype=torch.promote_types(weight.dtype, torch.float32),
        )
        for i in range(0, h.shape[0], chunk_rows):
            h_c, t_c = h[i : i + chunk_rows], targets[i : i + chunk_rows]
            logits = F.linear(h_c, weight)  # (n, V); bf16 under autocast, as the unchunked head
            logp = F.log_softmax(logits.float(), dim=-1)  # (n, V) fp32
            loss_sum = loss_sum + F.nll_loss(logp, t_c, ignore_index=-1, reduction="sum")
            # d mean / d logp: -1/total_weight at each kept target (reduction 1 = mean); then
            # through log_softmax
            grad_logp = torch.ops.aten.nll_loss_backward(one, logp, t_c, None, 1, -1, total_weight)
            dlogits = torch.ops.aten._log_softmax_backward_data(
                grad_logp, logp, 1, torch.float32
            ).to(logits.dtype)
            grad_h[i : i + chunk_rows] = (dlogits @ weight.to(logits.dtype)).to(h.dtype)  # (n, d)
            grad_w += (dlogits.t() @ h_c.to(logits.dtype)).to(grad_w.dtype)  # (V, d)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return (
            loss_sum / total_weight
        )  # 0/0 = nan when every target is ignored, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_elements: int
):
    """Mean cross-entropy of F.linear(h, weight) against targets (-1 ignored), equal to
    F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1), without materializing
    the logits. h (B, T, d), weight (V, d), targets (B, T). chunk_elements: logits per chunk (rows =
    chunk_elements // V). Without autograd (no_grad, or nothing requires grad) only the loss is
    computed, chunk by chunk."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    rows = max(1, chunk_elements // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(h, weight, targets, rows)
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        logits = F.linear(h[i : i + rows], weight).float()
        total = total + F.cross_entropy(
            logits, targets[i : i + rows], ignore_index=-1, reduction="sum"
        )
    return (
        total / (targets != -1).sum()
    )  # 0/0 = nan when every target is ignored, as F.cross_entropy's mean
