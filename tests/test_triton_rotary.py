"""Triton rotary embeddings through ``fastbert.ops.rotary(..., backend="triton")``: the rotated q, k
and both gradients against the fp64 reference (STYLE.md's rule; outputs poisoned), padded (default
positions, position_ids, strided views of a fused QKV) and varlen (cu_seqlens with empty and
length-1 sequences, position_ids), both pair layouts, partial rotary, awkward head_dims (26, 18:
a non-power-of-2 number of pairs), heads of q != heads of k, and the custom-op checks.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (conftest); no ``tl.dot`` is involved, so bf16
is checked like the other dtypes (stores round by ``cast_rne``). The in-place path is
``tests/test_rotary_inplace.py``.
"""

from __future__ import annotations

import pytest
import torch
from _cases import check_rounded_runs
from _pairwise import pairwise, parity_tests

pytest.importorskip("triton")

from fastbert.ops import rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AXES = {
    "layout": ("padded", "padded_position_ids", "qkv_views", "varlen", "varlen_position_ids"),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "interleaved": (False, True),
    "dims": ((64, 64), (80, 40), (26, 26), (96, 96), (18, 10)),  # (head_dim, rotary_dim)
}
CASES = pairwise(AXES)
# varlen: 5 sequences, one empty and one of length 1 (positions restart at 0 in each)
CU_SEQLENS = (0, 50, 50, 51, 90, 97)


def tables(max_positions, rotary_dim, base=10_000.0):
    """fp32 cos / sin ``(max_positions, rotary_dim / 2)`` of RoPE's angles ``p * base^(-2i / d)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def _case_id(c):
    return f"{c['layout']}-{str(c['dtype'])[6:]}-{'inter' if c['interleaved'] else 'half'}-d{c['dims'][0]}r{c['dims'][1]}"


def _inputs(case, seed=0):
    """q, k (fp64, on DEV), the rotary keywords and the output gradients for a case."""
    g = torch.Generator().manual_seed(seed)
    head_dim, rotary_dim = case["dims"]
    layout = case["layout"]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kw = {"interleaved": case["interleaved"]}
    if layout.startswith("varlen"):
        total = CU_SEQLENS[-1]
        q, k = r(total, 3, head_dim), r(total, 2, head_dim)
        if layout == "varlen":
            kw["cu_seqlens"] = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=DEV)
        else:
            kw["position_ids"] = torch.randint(0, 120, (total,), generator=g).to(DEV)
    elif layout == "qkv_views":  # ModernBERT's Wqkv output: q, k strided views
        qkv = r(2, 37, 3, 4, head_dim)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        q, k = r(2, 37, 4, head_dim), r(2, 37, 1, head_dim)
        if layout == "padded_position_ids":  # one row broadcast over the batch
            kw["position_ids"] = torch.randint(0, 120, (1, 37), generator=g).to(DEV)
    cos, sin = tables(120, rotary_dim)
    return q.to(DEV), k.to(DEV), cos.to(DEV), sin.to(DEV), kw, r(*q.shape).to(DEV), r(*k.shape).to(DEV)


def _run(backend, inputs, dtype, cast):
    """Outputs and gradients with q / k rounded to ``dtype`` then cast to ``cast``."""
    q, k, cos, sin, kw, dq_out, dk_out = inputs
    qs, ks = (t.to(dtype).to(cast).requires_grad_() for t in (q, k))
    if q.stride(-2) != q.shape[-1]:  # keep the strided view: same strides, rounded values
        qs, ks = (torch.empty_strided(t.shape, t.stride(), dtype=cast, device=DEV).copy_(t.to(dtype))
                  .requires_grad_() for t in (q, k))
    oq, ok = rotary(qs, ks, cos, sin, backend=backend, **kw)
    dq, dk = torch.autograd.grad((oq, ok), (qs, ks), (dq_out.to(dtype).to(cast), dk_out.to(dtype).to(cast)))
    return {"q_out": oq, "k_out": ok, "dq": dq, "dk": dk}


def _check(case):
    inputs, dtype = _inputs(case), case["dtype"]
    check_rounded_runs(lambda backend, cast: _run(backend, inputs, dtype, cast), "triton", dtype, out_dtype=dtype)


test_grid_covers_every_pair, test_parity_pairwise, test_parity_full = parity_tests(CASES, AXES, _check, _case_id)


@pytest.mark.parametrize("interleaved", [False, True])
def test_varlen_restarts_and_passthrough_exact(interleaved, poison):
    """fp32: each packed sequence equals the same sequence alone from position 0 (bitwise), and the
    features past rotary_dim are copied bitwise."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(97, 2, 24, generator=g).to(DEV), torch.randn(97, 1, 24, generator=g).to(DEV)
    cos, sin = (t.to(DEV) for t in tables(60, 14))
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=DEV)
    oq, ok = rotary(q, k, cos, sin, cu_seqlens=cu, interleaved=interleaved, backend="triton")
    for s, e in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]):
        if e > s:
            eq, ek = rotary(q[None, s:e], k[None, s:e], cos, sin, interleaved=interleaved, backend="triton")
            assert torch.equal(oq[s:e], eq[0]) and torch.equal(ok[s:e], ek[0])
    assert torch.equal(oq[..., 14:], q[..., 14:]) and torch.equal(ok[..., 14:], k[..., 14:])
    assert torch.equal(oq[CU_SEQLENS[2]], q[CU_SEQLENS[2]])  # the length-1 sequence: position 0, identity


def test_empty_inputs():
    cos, sin = (t.to(DEV) for t in tables(8, 8))
    e = torch.randn(0, 2, 8, device=DEV, requires_grad=True)
    oq, ok = rotary(e, e, cos, sin, cu_seqlens=torch.zeros(1, dtype=torch.int32, device=DEV), backend="triton")
    assert oq.shape == (0, 2, 8)
    assert torch.autograd.grad(oq.sum() + ok.sum(), e)[0].shape == (0, 2, 8)
    p = torch.randn(0, 5, 2, 8, device=DEV)
    assert rotary(p, p, cos, sin, backend="triton")[0].shape == (0, 5, 2, 8)


@pytest.mark.slow  # the custom op's opcheck / compile run by default on the torch backend (test_rotary / test_geglu)
def test_opcheck_and_compile():
    q = torch.randn(2, 5, 2, 8, device=DEV, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, device=DEV, requires_grad=True)
    cos, sin = (t.to(DEV) for t in tables(5, 6))
    pos = torch.arange(5, device=DEV).expand(2, 5)
    torch.library.opcheck(torch.ops.fastbert.rotary_fwd.default, (q, k, cos, sin, pos, True, "triton"))
    torch.library.opcheck(torch.ops.fastbert.rotary_bwd.default, (q.detach(), k.detach(), cos, sin, pos, False,
                                                                  "triton"))
    f = lambda q, k: rotary(q, k, cos, sin, backend="triton")  # noqa: E731
    with torch.no_grad():
        for a, b in zip(torch.compile(f, fullgraph=True)(q, k), f(q, k)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
