"""The composite rotary math (RoPE; Su et al. 2021, eq. 34): plain PyTorch, fp64-capable; shared
by the ``reference`` and ``torch`` backends (see :mod:`._composite`)."""

from __future__ import annotations

import torch

from fastbert.backends._composite_common import acc_dtype


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` over the last dim (GPT-NeoX / ModernBERT layout: first half, second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x):
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the RoPE paper's interleaved pairs."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_math(x, cos, sin, positions, interleaved=False):
    """``x * C + rot(x) * S`` on the first ``rotary_dim = 2 * cos.shape[1]`` features of each head,
    the rest passed through; computed in fp32 (fp64 for fp64 x).

    x ``[batch, seqlen, heads, head_dim]`` or ``[total, heads, head_dim]``; positions int
    ``[batch, seqlen]`` / ``[total]``; cos/sin ``[max_positions, rotary_dim / 2]``. ``C`` / ``S`` are
    the tables at each token's position widened to ``rotary_dim``: each frequency twice, as
    ``[c, c]`` (rotate_half layout) or ``[c0, c0, c1, c1, ...]`` (interleaved).
    """
    cdt = acc_dtype(x.dtype)
    r = 2 * cos.shape[-1]
    c = cos.to(cdt)[positions].unsqueeze(-2)  # [..., 1, r/2]: the same rotation for every head
    s = sin.to(cdt)[positions].unsqueeze(-2)
    if interleaved:
        big_c, big_s, rot = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1), rotate_pairs
    else:
        big_c, big_s, rot = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1), rotate_half
    xr = x[..., :r].to(cdt)
    return torch.cat((xr * big_c + rot(xr) * big_s, x[..., r:].to(cdt)), dim=-1)


def rotary_fwd(q, k, cos, sin, q_out, k_out, *, positions, interleaved):
    """Backend entry point: rotate q and k by each token's angles into q_out / k_out (which may be
    q / k themselves: the rotation is computed out of place, then copied)."""
    q_out.copy_(rotary_math(q, cos, sin, positions, interleaved))
    k_out.copy_(rotary_math(k, cos, sin, positions, interleaved))


def rotary_bwd(dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved):
    """Backend entry point: the rotation is orthogonal, so the gradient is the inverse rotation
    ``R(-theta) dy``: the forward with ``-sin``."""
    rotary_fwd(dq_out, dk_out, cos, -sin, dq, dk, positions=positions, interleaved=interleaved)
