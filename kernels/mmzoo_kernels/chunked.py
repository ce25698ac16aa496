"""Cross-entropy fused with the output projection, computed in chunks of tokens.

The naive loss materialises ``(N, V)`` logits (fp32: 4.9 GB for 8,192 tokens x 151,936 vocab),
keeps a log-softmax of the same size for backward and allocates two more in backward. Here
forward keeps only one fp32 log-sum-exp per token, and backward recomputes each chunk's logits,
so at most one ``(chunk, V)`` block exists at a time (the Liger-Kernel / Apple "cut your losses"
idea, written in plain PyTorch so it runs on every device).
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 1024  # one (1024, 151936) fp32 block is 0.6 GB; large enough for a full-speed GEMM


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # type: ignore[override]
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        picked = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = (hidden[start:end] @ weight.t()).to(acc)  # (chunk, V)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked[start:end] = logits.gather(1, safe[start:end, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk = chunk
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        chunk = ctx.chunk
        scale = torch.where(valid, grad_loss.to(lse.dtype), 0.0)  # (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Summed over chunks in fp32 and rounded to the weight's dtype once, as the naive path's
        # single GEMM is: a bf16 sum would round once per chunk.
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            h = hidden[start:end]
            probs = (h @ weight.t()).to(lse.dtype)  # (chunk, V) logits, turned into the gradient in place
            probs.sub_(lse[start:end, None]).exp_().mul_(scale[start:end, None])
            probs.scatter_add_(1, safe[start:end, None], -scale[start:end, None])
            grad_logits = probs.to(hidden.dtype)
            del probs
            if grad_h is not None:
                torch.matmul(grad_logits, weight, out=grad_h[start:end])
            if grad_w is not None:
                if grad_w.dtype == weight.dtype:
                    grad_w.addmm_(grad_logits.t(), h)
                else:
                    grad_w += grad_logits.t() @ h
            del grad_logits
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Same contract as :func:`mmzoo_kernels.reference.cross_entropy`, ``chunk_size`` tokens at a time.

    Under autocast the projection runs in the autocast dtype, as it would in the naive path;
    the casts happen here so that backward (which autocast does not reach) uses the same dtype.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    with torch.autocast(device, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size)
