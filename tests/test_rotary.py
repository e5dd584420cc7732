"""fastbert.ops.rotary: the reference vs independent formulations (transformers' ModernBERT
``apply_rotary_pos_emb`` for rotate_half, complex multiplication for the interleaved pairs), the
torch backend vs the fp64 reference (forward, gradients, poisoned outputs), varlen positions
restarting per sequence, position_ids, partial rotary, awkward sizes, validation, opcheck / compile."""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_close_to_ref

from fastbert.ops import rotary

CPU_BACKENDS = ("reference", "torch")


def tables(max_positions, rotary_dim, base=10_000.0, dtype=torch.float32):
    """cos / sin ``(max_positions, rotary_dim / 2)`` of RoPE's angles ``p * base^(-2i / d)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def complex_rope(x, cos, sin, positions):
    """Interleaved RoPE as complex multiplication by ``exp(i theta)`` (RoFormer sec. 3.4.2), fp64."""
    r = 2 * cos.shape[1]
    xc = torch.view_as_complex(x[..., :r].double().reshape(*x.shape[:-1], r // 2, 2).contiguous())
    rot = torch.complex(cos.double(), sin.double())[positions].unsqueeze(-2)
    return torch.cat((torch.view_as_real(xc * rot).flatten(-2), x[..., r:].double()), dim=-1)


def test_matches_modernbert_apply_rotary_pos_emb():
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 37, 4, 32, generator=g), torch.randn(2, 37, 4, 32, generator=g)
    cos, sin = tables(64, 32)
    pos = torch.stack([torch.arange(37), torch.arange(37) + 11])  # a second sequence shifted
    emb_cos, emb_sin = torch.cat((cos, cos), -1)[pos], torch.cat((sin, sin), -1)[pos]  # transformers' layout
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb_cos, emb_sin)
    for backend in CPU_BACKENDS:
        oq, ok = rotary(q, k, cos, sin, position_ids=pos, backend=backend)
        torch.testing.assert_close(oq, hq.transpose(1, 2), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ok, hk.transpose(1, 2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_interleaved_matches_complex_multiplication(rotary_dim):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 9, 2, 16, generator=g, dtype=torch.float64), torch.randn(3, 9, 1, 16, generator=g,
                                                                                   dtype=torch.float64)
    cos, sin = tables(9, rotary_dim, dtype=torch.float64)
    pos = torch.arange(9).expand(3, 9)
    for backend in CPU_BACKENDS:
        oq, ok = rotary(q, k, cos, sin, interleaved=True, backend=backend)
        torch.testing.assert_close(oq, complex_rope(q, cos, sin, pos), atol=1e-14, rtol=1e-13)
        torch.testing.assert_close(ok, complex_rope(k, cos, sin, pos), atol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_fp64(backend, interleaved, poison):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(7, 6, dtype=torch.float64)  # partial rotary: 6 of 8 features
    pos = torch.tensor([[0, 1, 4], [6, 0, 2]])
    assert torch.autograd.gradcheck(
        lambda q, k: rotary(q, k, cos, sin, position_ids=pos, interleaved=interleaved, backend=backend), (q, k),
        fast_mode=True)
    qv = torch.randn(5, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(5, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k: rotary(q, k, cos, sin, cu_seqlens=cu, interleaved=interleaved, backend=backend), (qv, kv),
        fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,heads_k,rotary_dim,interleaved", [
    ((2, 97, 3, 64), 3, 64, False), ((1, 1, 12, 80), 4, 40, True), ((3, 33, 2, 26), 1, 26, False),
    ((130, 5, 96), 5, 96, True)])
def test_torch_backend_matches_fp64_reference(dtype, shape, heads_k, rotary_dim, interleaved, poison):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*shape[:-2], heads_k, shape[-1], generator=g, dtype=torch.float64).to(dtype)
    cos, sin = tables(200, rotary_dim)
    kw = dict(interleaved=interleaved)
    if q.dim() == 3:  # varlen: 4 sequences, one empty
        kw["cu_seqlens"] = torch.tensor([0, 50, 50, 51, 130], dtype=torch.int32)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)

    def run(backend, cast):
        qs, ks = q.to(cast).requires_grad_(), k.to(cast).requires_grad_()
        oq, ok = rotary(qs, ks, cos, sin, backend=backend, **kw)
        return [oq, ok, *torch.autograd.grad((oq, ok), (qs, ks), (dq.to(cast), dk.to(cast)))]

    for name, o, h, lo in zip(["q_out", "k_out", "dq", "dk"], run("torch", dtype),
                              run("reference", torch.float64), run("reference", dtype)):
        assert_close_to_ref(o, h, lo, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_positions_restart_per_sequence(backend, poison):
    """Packed sequences rotate exactly as each sequence alone in the padded layout from position 0."""
    g = torch.Generator().manual_seed(4)
    lengths = [5, 0, 1, 9]
    cu = torch.tensor([0, 5, 5, 6, 15], dtype=torch.int32)
    q, k = torch.randn(15, 2, 16, generator=g), torch.randn(15, 2, 16, generator=g)
    cos, sin = tables(9, 16)
    for interleaved in (False, True):
        oq, ok = rotary(q, k, cos, sin, cu_seqlens=cu, interleaved=interleaved, backend=backend)
        starts = [0, 5, 5, 6]
        for s, n in zip(starts, lengths):
            if n:
                eq, ek = rotary(q[None, s:s + n], k[None, s:s + n], cos, sin, interleaved=interleaved,
                                backend=backend)
                torch.testing.assert_close(oq[s:s + n], eq[0], atol=0, rtol=0)
                torch.testing.assert_close(ok[s:s + n], ek[0], atol=0, rtol=0)
        # the same as explicit per-token positions
        pos = torch.cat([torch.arange(n) for n in lengths])
        pq, pk = rotary(q, k, cos, sin, position_ids=pos, interleaved=interleaved, backend=backend)
        assert torch.equal(pq, oq) and torch.equal(pk, ok)
    # positions that do not restart (0..14) rotate the later sequences differently
    cos15, sin15 = tables(15, 16)
    assert not torch.allclose(oq[6:], rotary(q, k, cos15, sin15, position_ids=torch.arange(15), interleaved=True,
                                             backend=backend)[0][6:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_position_zero_and_empty(backend, poison):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 11, 3, 4, 16, generator=g)  # ModernBERT's Wqkv view
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = tables(11, 16)
    oq, ok = rotary(q, k, cos, sin, backend=backend)
    eq, ek = rotary(q.contiguous(), k.contiguous(), cos, sin, backend=backend)
    assert torch.equal(oq, eq) and torch.equal(ok, ek)
    torch.testing.assert_close(oq[:, 0], q[:, 0], atol=0, rtol=0)  # position 0: the identity
    e = torch.randn(0, 2, 16, requires_grad=True)
    out = rotary(e, e, cos, sin, cu_seqlens=torch.zeros(1, dtype=torch.int32), backend=backend)
    assert out[0].shape == (0, 2, 16)
    assert torch.autograd.grad(out[0].sum() + out[1].sum(), e)[0].shape == (0, 2, 16)


def test_bad_inputs_raise_naming_the_argument():
    q = torch.randn(2, 6, 2, 8)
    cos, sin = tables(6, 8)
    with pytest.raises(ValueError, match="q: expected 3 or 4 dims"):
        rotary(q[0, 0], q[0, 0], cos, sin)
    with pytest.raises(TypeError, match="k: expected dtype"):
        rotary(q, q.double(), cos, sin)
    with pytest.raises(ValueError, match="k: expected q's leading dims"):
        rotary(q, q[:, :5], cos, sin)
    with pytest.raises(ValueError, match="sin: expected cos's shape"):
        rotary(q, q, cos, sin[:, :2])
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary(q, q, *tables(6, 10))
    with pytest.raises(ValueError, match=r"cos, sin: expected at least seqlen = 6 rows"):
        rotary(q, q, cos[:5], sin[:5])
    with pytest.raises(ValueError, match=r"position_ids: expected positions in \[0, 5\]"):
        rotary(q, q, cos, sin, position_ids=torch.tensor([[0, 1, 2, 3, 4, 6]]))
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(2 or 1, 6\)"):
        rotary(q, q, cos, sin, position_ids=torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids: expected dtype"):
        rotary(q, q, cos, sin, position_ids=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="cu_seqlens: only for the varlen layout"):
        rotary(q, q, cos, sin, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    qv = torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match="exactly one of them.*neither"):
        rotary(qv, qv, cos, sin)
    with pytest.raises(ValueError, match="exactly one of them.*both"):
        rotary(qv, qv, cos, sin, cu_seqlens=torch.tensor([0, 7], dtype=torch.int32), position_ids=torch.arange(7))
    with pytest.raises(ValueError, match="cu_seqlens: expected cu_seqlens\\[-1\\] == total_tokens"):
        rotary(qv, qv, cos, sin, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected positions in \[0, 5\]"):
        rotary(qv, qv, cos, sin, cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype"):
        rotary(qv, qv, cos, sin, cu_seqlens=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="cos: the rotary tables get no gradient"):
        rotary(q, q, cos.requires_grad_(), sin)
    with pytest.raises(TypeError, match="interleaved: expected a bool"):
        rotary(q, q, cos.detach(), sin, interleaved=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_and_compile(backend):
    q, k = torch.randn(2, 5, 2, 8, requires_grad=True), torch.randn(2, 5, 2, 8, requires_grad=True)
    cos, sin = tables(5, 8)
    pos = torch.arange(5).expand(2, 5)
    torch.library.opcheck(torch.ops.fastbert.rotary_fwd.default, (q, k, cos, sin, pos, False, backend))
    torch.library.opcheck(torch.ops.fastbert.rotary_bwd.default,
                          (q.detach(), k.detach(), cos, sin, pos, True, backend))
    f = lambda q, k: rotary(q, k, cos, sin, backend=backend)  # noqa: E731
    for a, b in zip(torch.compile(f, fullgraph=True)(q, k), f(q, k)):
        torch.testing.assert_close(a, b)
