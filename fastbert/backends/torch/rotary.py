"""Rotary position embeddings on the torch backend (rotate_half and interleaved layouts)."""

from __future__ import annotations

import torch


def _rotate_into(x, out, c, s, interleaved):
    """``out = R(theta) x`` on the rotated features by halves (no full-width temporaries):
    ``o1 = x1 c - x2 s``, ``o2 = x2 c + x1 s``; c/s ``[..., 1, r/2]`` in the compute dtype."""
    r = 2 * c.shape[-1]
    if interleaved:
        x1, x2, o1, o2 = x[..., 0:r:2], x[..., 1:r:2], out[..., 0:r:2], out[..., 1:r:2]
    else:
        h = r // 2
        x1, x2, o1, o2 = x[..., :h], x[..., h:r], out[..., :h], out[..., h:r]
    inplace = out is x  # fastbert.ops.rotary(inplace=True)
    if x.dtype == c.dtype and inplace:  # o1 overwrites x1, which o2 still needs: keep a copy
        x1c = x1.clone()  # (the out-of-place arithmetic, op for op: bitwise the same result)
        x1.mul_(c).addcmul_(x2, s, value=-1.0)
        x2.mul_(c).addcmul_(x1c, s)
    elif x.dtype == c.dtype:
        torch.mul(x1, c, out=o1)
        o1.addcmul_(x2, s, value=-1.0)
        torch.mul(x2, c, out=o2)
        o2.addcmul_(x1, s)
    else:  # fp16/bf16: fp32 math on fp32 copies (so also in place), one rounding
        x1f, x2f = x1.to(c.dtype), x2.to(c.dtype)
        o1.copy_(torch.addcmul(x1f * c, x2f, s, value=-1.0))
        o2.copy_(torch.addcmul(x2f * c, x1f, s))
    if r < x.shape[-1] and not inplace:
        out[..., r:].copy_(x[..., r:])


def rotary_fwd(q, k, cos, sin, q_out, k_out, *, positions, interleaved):
    """Backend entry point: the tables gathered once per token (shared by q, k and every head);
    ``q_out`` / ``k_out`` may be ``q`` / ``k`` themselves (in place)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = cos.to(cdt)[positions].unsqueeze(-2)  # [..., 1, r/2]
    s = sin.to(cdt)[positions].unsqueeze(-2)
    _rotate_into(q, q_out, c, s, interleaved)
    _rotate_into(k, k_out, c, s, interleaved)


def rotary_bwd(dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved):
    """Backend entry point: the inverse rotation (the forward with ``-sin``)."""
    rotary_fwd(dq_out, dk_out, cos, -sin, dq, dk, positions=positions, interleaved=interleaved)
