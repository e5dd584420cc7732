"""The Triton attention kernels' local window (``window=(left, right)``), at the backend entry points.

Query i sees key j iff ``i - left <= j <= i + right`` (positions within the sequence; top-left
aligned when seqlen_q != seqlen_k), on top of the usual masks; a row with no visible key is empty.
Checked, forward and every gradient, against a dense band: the reference backend with the window
written as a ``-inf`` bias (fp64, and in the kernel's dtype for the tolerance rule of
``_tolerance``), per sequence for varlen; with dropout against the Triton kernels' own global path
with the same band bias (the Philox mask is keyed by logical positions, so it is the same mask).
Outputs are NaN-poisoned before the kernels write them.

The kernels skip the key tiles outside the window; ``test_window_skips_tiles`` counts the score
tiles the interpreted kernels compute. Runs under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

import fastbert.ops as ops  # noqa: E402  (installs the workspace allocator the backward uses)
from fastbert.backends.triton import attention as tri  # noqa: E402
from _tolerance import assert_close_to_ref  # noqa: E402

NAN = float("nan")


def _band(lq: int, lk: int, window) -> torch.Tensor:
    """bool [lq, lk]: query i sees key j."""
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return (j >= i - window[0]) & (j <= i + window[1])


def _band_bias(lq: int, lk: int, window, dtype) -> torch.Tensor:
    return torch.zeros(lq, lk, dtype=dtype).masked_fill(~_band(lq, lk, window), float("-inf"))


def _inputs(batch, lq, lk, heads, head_dim, *, varlen_lengths=None, mask=False, bias=False, seed=0):
    """fp64 inputs: q/k/v/dout (padded, or varlen packed with ``varlen_lengths``), a key padding
    mask and a [batch, heads, lq, lk] bias when asked."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inp = {}
    if varlen_lengths is not None:
        total = sum(varlen_lengths)
        inp["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(varlen_lengths)], dtype=torch.int32)
        inp["max_seqlen"] = max(varlen_lengths)
        for n in ("q", "k", "v", "dout"):
            inp[n] = rnd(total, heads, head_dim)
        return inp
    inp.update(q=rnd(batch, lq, heads, head_dim), k=rnd(batch, lk, heads, head_dim),
               v=rnd(batch, lk, heads, head_dim), dout=rnd(batch, lq, heads, head_dim))
    if mask:
        lengths = torch.randint(1, lk + 1, (batch,), generator=g)
        lengths[0] = lk
        inp["attention_mask"] = torch.arange(lk)[None, :] < lengths[:, None]
    if bias:
        inp["attn_bias"] = rnd(batch, heads, lq, lk)
    return inp


def _triton(inp, dtype, window, *, extra_bias=None, dropout_p=0.0, seed=None):
    """The Triton entry points, outputs NaN-poisoned: {out, dq, dk, dv[, dbias]}."""
    q, k, v, dout = (inp[n].to(dtype) for n in ("q", "k", "v", "dout"))
    varlen = "cu_seqlens" in inp
    bias = inp.get("attn_bias")
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
    bias = None if bias is None else bias.to(dtype).expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    kw = dict(attention_mask=inp.get("attention_mask"), attn_bias=bias, cu_seqlens=inp.get("cu_seqlens"),
              max_seqlen=inp.get("max_seqlen"), dropout_p=dropout_p, seed=seed,
              softmax_scale=q.shape[-1] ** -0.5, allow_tf32=False, deterministic=False)
    if window is not None:
        kw["window"] = window
    out = torch.full_like(q, NAN)
    lse_shape = (2, q.shape[1], q.shape[0]) if varlen else (2, q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, NAN, dtype=torch.float32)
    tri.attention_fwd(q, k, v, out, lse, **kw)
    dq, dk, dv = (torch.full_like(t, NAN) for t in (q, k, v))
    dbias = torch.full(bias.shape, NAN, dtype=torch.float32) if bias is not None else None
    tri.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, **kw)
    got = dict(out=out, dq=dq, dk=dk, dv=dv)
    if "attn_bias" in inp:
        got["dbias"] = dbias
    return got


def _reference(inp, dtype, window):
    """The reference backend with the band as a ``-inf`` bias (per sequence for varlen)."""
    leaves = {n: inp[n].to(dtype).requires_grad_() for n in ("q", "k", "v")}
    if "attn_bias" in inp:
        leaves["dbias"] = inp["attn_bias"].to(dtype).requires_grad_()
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if "cu_seqlens" in inp:
        cu = inp["cu_seqlens"].tolist()
        outs = []
        for s, e in zip(cu[:-1], cu[1:]):
            if e > s:
                outs.append(ops.attention(q[None, s:e], k[None, s:e], v[None, s:e], backend="reference",
                                          attn_bias=_band_bias(e - s, e - s, window, dtype)[None, None])[0])
        out = torch.cat(outs)
    else:
        bias = _band_bias(q.shape[1], k.shape[1], window, dtype)[None, None]
        if "dbias" in leaves:
            bias = bias + leaves["dbias"]
        out = ops.attention(q, k, v, attention_mask=inp.get("attention_mask"), attn_bias=bias,
                            backend="reference")
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], inp["dout"].to(dtype))
    return dict(out=out.detach(), **{("d" + n if n != "dbias" else n): g for n, g in zip(names, grads)})


def _check(inp, dtype, window):
    got = _triton(inp, dtype, window)
    hi = _reference(inp, torch.float64, window)
    lo = _reference(inp, dtype, window)
    assert set(got) == set(hi)
    for name in hi:
        # dS cancels delta = rowsum(dO * O) against dO V^T (see test_triton_attention's floor).
        assert_close_to_ref(got[name], hi[name], lo[name], name=name,
                            floor_eps=4.0 if name == "out" else 64.0)


CASES = [  # (batch, seqlen_q, seqlen_k, heads, head_dim, window, dtype, mask, bias)
    (2, 70, 70, 1, 40, (5, 9), torch.float32, True, True),  # padded, masked, bias + dbias
    (1, 97, 97, 1, 32, (16, 16), torch.float16, True, False),
    (1, 90, 33, 1, 32, (2, 2), torch.float32, False, False),  # seqlen_q > seqlen_k: empty rows past 35
    (1, 40, 75, 1, 32, (0, 20), torch.bfloat16, False, False),  # seqlen_q < seqlen_k, one-sided
    (1, 50, 50, 2, 16, (0, 0), torch.float32, False, True),  # the diagonal only
    (2, 17, 29, 1, 24, (100, 100), torch.float16, True, False),  # window larger than the sequence
]


@pytest.mark.parametrize("batch,lq,lk,heads,head_dim,window,dtype,mask,bias", CASES,
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_window_padded(batch, lq, lk, heads, head_dim, window, dtype, mask, bias, poison):
    inp = _inputs(batch, lq, lk, heads, head_dim, mask=mask, bias=bias, seed=lq * 131 + lk)
    _check(inp, dtype, window)


@pytest.mark.parametrize("dtype,window", [(torch.bfloat16, (7, 7)), (torch.float32, (0, 3))])
def test_window_varlen(dtype, window, poison):
    """Varlen: positions restart per sequence; an empty sequence and ones shorter than a tile."""
    inp = _inputs(None, None, None, 2, 32, varlen_lengths=[70, 0, 5, 41], seed=7)
    _check(inp, dtype, window)


@pytest.mark.slow  # ~2.5% of the default suite; by default the windowed dropout runs against the
#                    reference's mask in test_window_attention.py (five Triton cases)
def test_window_with_dropout_is_the_band_bias():
    """Dropout: the window equals its dense ``-inf`` band bias on the global path, same seed."""
    inp = _inputs(1, 66, 66, 2, 32, mask=True, bias=True, seed=3)
    seed = torch.tensor([0x1234567, 0x89ABCDE], dtype=torch.int64)
    window = (4, 11)
    got = _triton(inp, torch.float32, window, dropout_p=0.3, seed=seed)
    ref = _triton(inp, torch.float32, None, dropout_p=0.3, seed=seed,
                  extra_bias=_band_bias(66, 66, window, torch.float64)[None, None])
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_window_keys_no_query_sees_have_no_influence():
    """NaN in the K and V rows of the keys past every query's window (j > seqlen_q - 1 + right):
    no NaN anywhere, the same result as with finite values there, and zero dK, dV for them."""
    inp = _inputs(1, 40, 96, 1, 32, seed=11)
    window = (3, 5)
    seen = _band(40, 96, window).any(0)
    assert not seen.all()
    inp_nan = dict(inp, k=inp["k"].clone(), v=inp["v"].clone())
    inp_nan["k"][:, ~seen] = NAN
    inp_nan["v"][:, ~seen] = NAN
    got = _triton(inp_nan, torch.float32, window)
    ref = _triton(inp, torch.float32, window)
    for name in got:
        assert not torch.isnan(got[name]).any(), name
        if name != "dk" and name != "dv":
            torch.testing.assert_close(got[name], ref[name], msg=name)
    torch.testing.assert_close(got["dk"][:, seen], ref["dk"][:, seen])
    assert (got["dk"][:, ~seen] == 0).all() and (got["dv"][:, ~seen] == 0).all()


def _tiles_walked(rows: int, cols: int, before: int, after: int, tile_rows: int, tile_cols: int) -> int:
    """Tiles of ``tile_cols`` along ``cols`` that each ``tile_rows`` tile of rows walks, in total."""
    total = 0
    for r0 in range(0, rows, tile_rows):
        lo, hi = max(r0 - before, 0) // tile_cols * tile_cols, min(min(r0 + tile_rows, rows) + after, cols)
        total += len(range(lo, hi, tile_cols))
    return total


def test_window_skips_tiles(monkeypatch):
    """The forward and dQ kernels walk only the key tiles some row of theirs can see, the dK/dV
    kernel only the query tiles that see its keys: count the score tiles computed."""
    from fastbert.backends.triton import _attention_bwd, _attention_fwd
    from fastbert.backends.triton._attention_common import attention_config

    calls = {"fwd": 0, "bwd": 0}
    for mod, key in ((_attention_fwd, "fwd"), (_attention_bwd, "bwd")):
        def counted(*a, _orig=mod._scores, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(mod, "_scores", counted)
    seqlen, window = 200, (6, 3)
    inp = _inputs(1, seqlen, seqlen, 1, 16, seed=5)
    got = _triton(inp, torch.float32, window)
    bm, bn, _, _ = attention_config("fwd", 16, torch.float32)
    fwd = _tiles_walked(seqlen, seqlen, window[0], window[1], bm, bn)
    bm_dq, bn_dq, _, _ = attention_config("dq", 16, torch.float32)
    bm_kv, bn_kv, _, _ = attention_config("dkdv", 16, torch.float32)
    dq = _tiles_walked(seqlen, seqlen, window[0], window[1], bm_dq, bn_dq)
    dkdv = _tiles_walked(seqlen, seqlen, window[1], window[0], bn_kv, bm_kv)  # keys walk queries
    assert calls == {"fwd": fwd, "bwd": dq + dkdv}, calls
    full = -(-seqlen // bm) * -(-seqlen // bn)
    assert fwd <= full // 2, (fwd, full)  # the saving is real at this size
    hi, lo = _reference(inp, torch.float64, window), _reference(inp, torch.float32, window)
    for name in got:
        assert_close_to_ref(got[name], hi[name], lo[name], name=name, floor_eps=16.0)
