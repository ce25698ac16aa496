"""Triton kernels (imported only when triton is installed): fused RMSNorm and rotary apply."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference rounds here
    tl.store(Y + row * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, stride_dy, stride_x, stride_dx, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        weight = weight.contiguous()  # the kernels index it as a dense vector
        rows, n = x2.shape
        y = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if rows:
            _rms_norm_fwd[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        rows, n = x2.shape
        dx = torch.empty_like(x2)
        if rows:
            block = triton.next_power_of_2(n)
            _rms_norm_bwd[(rows,)](
                dy2, x2, weight, rstd, dx, dy2.stride(0), x2.stride(0), dx.stride(0), n, BLOCK=block
            )
        dw = None
        if ctx.needs_input_grad[1]:
            xhat = (x2.float() * rstd[:, None]).to(x2.dtype)
            dw = (dy2.float() * xhat.float()).sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None


@triton.jit
def _rotary(
    X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st, H, HALF,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c1 = tl.load(COS + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * stride_ct + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * stride_st + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * stride_st + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation: halves of sin swapped and negated
        s1, s2 = -s2, -s1
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < H) & dmask[None, :]
    x_ptr = X + t * stride_xt + h * stride_xh + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y_ptr = Y + t * stride_yt + h * stride_yh + d[None, :]
    tl.store(y_ptr, (x1 * c1[None, :] - x2 * s1[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    tokens, heads, dim = x.shape
    y = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    if tokens:
        _rotary[(tokens,)](
            x, cos, sin, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0),
            sin.stride(0), heads, dim // 2,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(dim // 2),
            BACKWARD=backward,
        )  # fmt: skip
    return y


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True).to(ctx.dtype), None, None
