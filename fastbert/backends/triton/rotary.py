"""Triton rotary position embeddings, forward and backward (the ``triton`` backend's compute module
for ``rotary``).

RoPE (Su et al. 2021, "RoFormer", eq. 34) rotates each pair ``(x1, x2)`` of a head's first
``rotary_dim`` features by the angle ``theta_i * position`` of the token::

    o1 = x1 cos - x2 sin,    o2 = x2 cos + x1 sin                       (forward, R(theta))
    dx1 = do1 cos + do2 sin, dx2 = do2 cos - do1 sin                    (backward, R(-theta) = R^T)

Pairs are ``(i, i + rotary_dim / 2)`` (``rotate_half``: GPT-NeoX, ModernBERT) or ``(2i, 2i + 1)``
(``interleaved``: the RoPE paper). The rotation is orthogonal, so backward is the forward with
``sin`` negated (the ``CONJ`` constexpr; no negated table is allocated). Features at and past
``rotary_dim`` are copied (partial rotary), or left alone when the output is the input.

One program takes ``BLOCK_T`` tokens: it gathers their rows of ``cos`` / ``sin`` once (the same
rotation for every head of q and of k) and walks q's heads, then k's. Each program reads every
element it writes before writing it, so an output may alias its input (``fastbert.ops.rotary``'s
``inplace=True`` passes ``q_out is q``): the kernel is in-place safe. Inputs and outputs carry their
own strides (any strides with a contiguous last dim); token offsets are 64-bit. Math in fp32, one
rounding to the output dtype at the store.

Positions: padded ``[batch, seqlen]`` int64 with its strides (stride 0 for a broadcast batch), token
``t`` at ``(t // seqlen, t % seqlen)``; varlen ``[total_tokens]`` (batch 1, seqlen = total_tokens),
already restarting per sequence (the ops layer computes them from ``cu_seqlens`` on the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.backends.triton._common import TILE_SCALE, cast_rne, device_ctx


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr,                  # this tensor's input / output at token 0, head 0
    x_tok, o_tok,                  # [BLOCK_T] int64 token offsets (elements) into x / out
    sxh, soh,                      # head strides of x / out
    heads, head_dim, half,
    c, s,                          # [BLOCK_T, BLOCK_HALF] fp32 tables (s negated for backward)
    tok_mask, cols, col_mask, tail, tail_mask,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    """Rotate every head of one tensor for the program's tokens (see the module docstring)."""
    mask = tok_mask[:, None] & col_mask[None, :]
    BLOCK_T: tl.constexpr = c.shape[0]
    BLOCK_HALF: tl.constexpr = c.shape[1]
    # interleaved: the pairs' 2 * BLOCK_HALF features as one contiguous tile, split into even / odd
    pcols = tl.arange(0, 2 * BLOCK_HALF)
    pmask = tok_mask[:, None] & (pcols < 2 * half)[None, :]
    for h in range(heads):
        xb = x_ptr + (x_tok + h * sxh)[:, None]
        ob = o_ptr + (o_tok + h * soh)[:, None]
        if INTERLEAVED:
            xp = tl.load(xb + pcols[None, :], mask=pmask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(xp, (BLOCK_T, BLOCK_HALF, 2)))
        else:
            x1 = tl.load(xb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xb + (cols + half)[None, :], mask=mask, other=0.0).to(tl.float32)
        if COPY_TAIL:  # loaded before any store: in-place safe either way
            tmask = tok_mask[:, None] & tail_mask[None, :]
            xt = tl.load(xb + tail[None, :], mask=tmask, other=0.0)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if INTERLEAVED:
            op = tl.reshape(tl.join(o1, o2), (BLOCK_T, 2 * BLOCK_HALF))
            tl.store(ob + pcols[None, :], cast_rne(op, o_ptr.dtype.element_ty), mask=pmask)
        else:
            tl.store(ob + cols[None, :], cast_rne(o1, o_ptr.dtype.element_ty), mask=mask)
            tl.store(ob + (cols + half)[None, :], cast_rne(o2, o_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            tl.store(ob + tail[None, :], xt.to(o_ptr.dtype.element_ty), mask=tmask)


@triton.jit(do_not_specialize=["ntokens", "seqlen"])
def _rotary_kernel(
    q_ptr,     # [batch, seqlen, heads_q, head_dim] or [total, heads_q, head_dim] input (strided)
    k_ptr,     # like q with heads_k heads
    qo_ptr,    # q's output: like q (may be q itself)
    ko_ptr,    # k's output: like k (may be k itself)
    cos_ptr,   # [max_positions, half] fp32 (contiguous)
    sin_ptr,   # [max_positions, half] fp32 (contiguous)
    pos_ptr,   # [batch, seqlen] or [total] int64 table rows (strided)
    ntokens, seqlen, heads_q, heads_k, head_dim, half,
    sqb, sqs, sqh, skb, sks, skh,        # q / k strides: batch (0 for varlen), token, head
    sqob, sqos, sqoh, skob, skos, skoh,  # the outputs' strides
    spb, sps,                            # positions' strides: batch, token
    INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = t < ntokens
    b, si = t // seqlen, t % seqlen
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    tail = 2 * half + tl.arange(0, BLOCK_TAIL)
    tail_mask = tail < head_dim
    pos = tl.load(pos_ptr + b * spb + si * sps, mask=tok_mask, other=0)
    tmask = tok_mask[:, None] & col_mask[None, :]
    toffs = pos[:, None] * half + cols[None, :]
    c = tl.load(cos_ptr + toffs, mask=tmask, other=0.0)
    s = tl.load(sin_ptr + toffs, mask=tmask, other=0.0)
    if CONJ:
        s = -s
    _rotate_heads(q_ptr, qo_ptr, b * sqb + si * sqs, b * sqob + si * sqos, sqh, sqoh, heads_q, head_dim, half,
                  c, s, tok_mask, cols, col_mask, tail, tail_mask, INTERLEAVED, COPY_TAIL)
    _rotate_heads(k_ptr, ko_ptr, b * skb + si * sks, b * skob + si * skos, skh, skoh, heads_k, head_dim, half,
                  c, s, tok_mask, cols, col_mask, tail, tail_mask, INTERLEAVED, COPY_TAIL)


def config(half: int) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)``: about 2048 elements of one head per tile (``BLOCK_T`` tokens x
    ``BLOCK_HALF`` pairs), at least 16 and at most 128 tokens; 16x taller under the interpreter."""
    block_half = triton.next_power_of_2(half)
    block_t = max(16, min(128, 2048 // block_half))
    return block_t * TILE_SCALE, 4


def _tok_strides(t):
    """(batch, token, head) strides of a padded ``[B, S, H, D]`` or varlen ``[T, H, D]`` tensor."""
    return (t.stride(0), t.stride(1), t.stride(2)) if t.dim() == 4 else (0, t.stride(0), t.stride(1))


def launch(q, k, cos, sin, q_out, k_out, positions, *, interleaved: bool, conj: bool, shape=None):
    """``(grid, kwargs)`` of a launch (shared by the launcher and ``aot_variants``; ``shape`` gives
    ``(ntokens, seqlen, heads_q, heads_k, head_dim)`` for stand-in pointers)."""
    half = cos.shape[1] if shape is None else shape[-1]
    if shape is None:
        ntokens, seqlen = (q.shape[0] * q.shape[1], q.shape[1]) if q.dim() == 4 else (q.shape[0], q.shape[0])
        heads_q, heads_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
        strides = (*_tok_strides(q), *_tok_strides(k), *_tok_strides(q_out), *_tok_strides(k_out))
        pos_strides = (positions.stride(0), positions.stride(1)) if positions.dim() == 2 else (0, positions.stride(0))
    else:
        ntokens, seqlen, heads_q, heads_k, head_dim, half = shape
        strides = (0, heads_q * head_dim, head_dim, 0, heads_k * head_dim, head_dim) * 2
        pos_strides = (0, 1)
    block_t, num_warps = config(half)
    tail = head_dim - 2 * half
    kwargs = dict(q_ptr=q, k_ptr=k, qo_ptr=q_out, ko_ptr=k_out, cos_ptr=cos, sin_ptr=sin, pos_ptr=positions,
                  ntokens=ntokens, seqlen=seqlen, heads_q=heads_q, heads_k=heads_k, head_dim=head_dim, half=half,
                  **dict(zip(("sqb", "sqs", "sqh", "skb", "sks", "skh", "sqob", "sqos", "sqoh", "skob", "skos",
                              "skoh"), strides)),
                  spb=pos_strides[0], sps=pos_strides[1], INTERLEAVED=interleaved, CONJ=conj,
                  COPY_TAIL=tail > 0 and not (q_out is q and k_out is k),
                  BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(half),
                  BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)), num_warps=num_warps)
    return (triton.cdiv(ntokens, block_t),), kwargs


def _run(q, k, cos, sin, q_out, k_out, positions, interleaved, conj):
    ntokens = q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0]
    if ntokens == 0:
        return
    grid, kwargs = launch(q, k, cos, sin, q_out, k_out, positions, interleaved=interleaved, conj=conj)
    with device_ctx(q):
        _rotary_kernel[grid](**kwargs)


def rotary_fwd(q, k, cos, sin, q_out, k_out, *, positions, interleaved):
    """Backend entry point (see ``fastbert.backends``): ``q_out, k_out = R(theta) q, R(theta) k``;
    ``q_out`` / ``k_out`` may be ``q`` / ``k`` themselves (in place)."""
    _run(q, k, cos, sin, q_out, k_out, positions, interleaved, False)


def rotary_bwd(dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved):
    """Backend entry point: ``dq, dk = R(-theta) dq_out, R(-theta) dk_out`` (may alias, as forward)."""
    _run(dq_out, dk_out, cos, sin, dq, dk, positions, interleaved, True)


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants: forward and backward, both layouts, at the highest pressure
    (partial rotary 96 of head_dim 128: the tail copy too), fp16 and bf16; with ``full`` also fp32
    and head_dim / rotary_dim 32, 64 (ModernBERT-base), 80, 128, 256. Spill budget 0."""
    from fastbert.backends.triton._aot import AotVariant, pointer, split_launch

    dtypes = (torch.float16, torch.bfloat16, torch.float32) if full else (torch.float16, torch.bfloat16)
    dims = ((32, 32), (64, 64), (80, 80), (128, 96), (128, 128), (256, 256)) if full else ((128, 96),)
    out = []
    for dt in dtypes:
        for head_dim, rotary_dim in dims:
            for interleaved in (False, True):
                for conj in (False, True):
                    t, f32, i64 = pointer(dt), pointer(torch.float32), pointer(torch.int64)
                    _, kw = launch(t, t, f32, f32, pointer(dt), pointer(dt), i64, interleaved=interleaved,
                                   conj=conj, shape=(8192, 8192, 12, 12, head_dim, rotary_dim // 2))
                    name = (f"rotary_{'bwd' if conj else 'fwd'} {str(dt)[6:]} head_dim={head_dim} "
                            f"rotary_dim={rotary_dim} {'interleaved' if interleaved else 'half'}")
                    out.append(AotVariant(name, _rotary_kernel, *split_launch(_rotary_kernel, kw)))
    return out
