"""``fastbert.ops.rotary(..., inplace=True)`` on every backend (reference, torch, Triton under the
interpreter): the same values as out of place, bitwise, written into q's and k's own storage
(strided views of a fused QKV projection, padded and varlen, partial rotary: the tail untouched);
the same gradients through autograd (views of a non-leaf: autograd rebases their history); a
tensor saved before the rotation raises at backward; the errors for what cannot be rotated in
place; the mutating custom op's annotation (opcheck) and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from fastbert.ops import rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("triton"), reason="triton not installed")))


def tables(max_positions, rotary_dim, dtype=torch.float32):
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(dtype).to(DEV), angles.sin().to(dtype).to(DEV)


def _qkv_block(x, weight, shape, dtype):
    """``(q, k, v)``: select views of a fresh projection output ``[..., 3, heads, head_dim]``."""
    qkv = (x @ weight).to(dtype).view(shape)
    return qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place_with_gradients(backend, layout, interleaved, dtype, poison):
    g = torch.Generator().manual_seed(11)
    heads, head_dim, rotary_dim = 2, 24, 18  # partial rotary: 6 features pass through
    lead = (2, 13) if layout == "padded" else (19,)
    kw = {"interleaved": interleaved}
    if layout == "varlen":
        kw["cu_seqlens"] = torch.tensor([0, 7, 7, 8, 19], dtype=torch.int32, device=DEV)
    x = torch.randn(*lead, 16, generator=g, dtype=torch.float64).to(DEV)
    w = torch.randn(16, 3 * heads * head_dim, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    cos, sin = tables(20, rotary_dim)
    shape = lead + (3, heads, head_dim)

    def run(inplace):
        q, k, v = _qkv_block(x, w, shape, dtype)
        before = (q.clone(), k.clone())
        oq, ok = rotary(q, k, cos, sin, inplace=inplace, backend=backend, **kw)
        if inplace:  # rotated in their own storage, the tail left alone
            assert oq is q and ok is k
            assert not torch.equal(oq, before[0])
            assert torch.equal(oq[..., rotary_dim:], before[0][..., rotary_dim:])
        loss = (oq.double() * v.double()).sum() + (ok.double() ** 2).sum()
        return oq.detach().clone(), ok.detach().clone(), torch.autograd.grad(loss, w)[0]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_no_grad_and_one_side_requiring_grad(backend):
    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(3, 5, 2, 8, generator=g).to(DEV), torch.randn(3, 5, 1, 8, generator=g).to(DEV)
    cos, sin = tables(5, 8)
    want = rotary(q, k, cos, sin, backend=backend)
    q2, k2 = q.clone(), k.clone()
    with torch.no_grad():
        rotary(q2, k2, cos, sin, inplace=True, backend=backend)
    assert torch.equal(q2, want[0]) and torch.equal(k2, want[1])
    # only k needs a gradient: q's node is built without one, k's gets R(-theta) dk
    base = k.clone().requires_grad_()
    q3, k3 = q.clone(), base * 1.0
    oq, ok = rotary(q3, k3, cos, sin, inplace=True, backend=backend)
    dk_out = torch.randn(ok.shape, generator=g).to(DEV)
    (dk,) = torch.autograd.grad(ok, base, dk_out)
    ref_k = k.clone().requires_grad_()
    (want_dk,) = torch.autograd.grad(rotary(q, ref_k, cos, sin, backend=backend)[1], ref_k, dk_out)
    assert not oq.requires_grad and torch.equal(oq, want[0]) and torch.equal(dk, want_dk)


def test_saved_tensor_modified_in_place_raises():
    """Autograd's version counter sees the rotation: a tensor saved before it fails at backward."""
    q = torch.randn(2, 4, 1, 8, device=DEV).requires_grad_()
    k = torch.randn(2, 4, 1, 8, device=DEV)
    cos, sin = tables(4, 8)
    q2 = q * 1.0
    saved = q2.exp()  # exp saves its output, not q2; sin saves its input q2
    s = q2.sin()
    rotary(q2, k, cos, sin, inplace=True, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (s.sum() + saved.sum()).backward()


def test_inplace_errors_name_the_argument():
    cos, sin = tables(6, 8)
    q = torch.randn(2, 6, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="q: inplace=True would overwrite a leaf that requires grad"):
        rotary(q.clone().requires_grad_(), q.clone(), cos, sin, inplace=True)
    with pytest.raises(ValueError, match="k: inplace=True would overwrite a leaf that requires grad"):
        rotary(q.clone(), q.clone().requires_grad_(), cos, sin, inplace=True)
    with pytest.raises(ValueError, match="q, k: inplace=True needs q and k in disjoint memory"):
        rotary(q, q, cos, sin, inplace=True)
    big = torch.randn(2, 6, 3, 8, device=DEV)
    with pytest.raises(ValueError, match="q, k: inplace=True needs q and k in disjoint memory"):
        rotary(big[:, :, :2], big[:, :, 1:], cos, sin, inplace=True)
    with pytest.raises(ValueError, match="q: inplace=True needs a contiguous last dim"):
        rotary(torch.randn(2, 6, 2, 16, device=DEV)[..., ::2], q.clone(), cos, sin, inplace=True)
    with pytest.raises(ValueError, match="k: inplace=True cannot write a tensor whose elements share memory"):
        rotary(q.clone(), torch.randn(1, 6, 2, 8, device=DEV).expand(2, 6, 2, 8), cos, sin, inplace=True)
    with pytest.raises(TypeError, match="inplace: expected a bool"):
        rotary(q, q.clone(), cos, sin, inplace=1)
    # disjoint views of one buffer (the fused QKV case) are accepted; under no_grad a leaf is too
    qkv = torch.randn(2, 6, 3, 2, 8, device=DEV)
    rotary(qkv[:, :, 0], qkv[:, :, 1], cos, sin, inplace=True)
    with torch.no_grad():
        rotary(q.clone().requires_grad_(), q.clone(), cos, sin, inplace=True)


def test_opcheck_and_compile():
    cos, sin = tables(5, 6)
    q, k = torch.randn(2, 5, 2, 8, device=DEV), torch.randn(2, 5, 1, 8, device=DEV)
    pos = torch.arange(5, device=DEV).expand(2, 5)
    torch.library.opcheck(torch.ops.fastbert.rotary_fwd_.default, (q.clone(), k.clone(), cos, sin, pos, True, "torch"))

    def f(q, k):
        q, k = q * 1.0, k * 1.0  # fresh buffers, rotated in place
        return rotary(q, k, cos, sin, inplace=True, backend="torch")

    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    got, want = torch.compile(f, fullgraph=True)(qg, kg), f(qg, kg)
    dq_out = torch.randn_like(q)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ga = torch.autograd.grad(got[0].mul(dq_out).sum() + got[1].sum(), (qg, kg))
    gb = torch.autograd.grad(want[0].mul(dq_out).sum() + want[1].sum(), (qg, kg))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_modernbert_attention_inplace_matches_out_of_place():
    """fastbert's ModernBERT with ``rotary_inplace`` on gives the same outputs and gradients
    (padded and unpadded), so the switch is a pure speed decision."""
    transformers = pytest.importorskip("transformers")
    import fastbert.models as fm
    from fastbert.nn.modernbert import ModernBertAttention

    cfg = transformers.ModernBertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=3, pad_token_id=0)
    torch.manual_seed(0)
    model = fm.ModernBertModel(cfg).eval()
    ids = torch.randint(3, 97, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 1:] = 0

    def run(inplace, **kw):
        old = ModernBertAttention.rotary_inplace
        ModernBertAttention.rotary_inplace = inplace
        try:
            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
            out.mul(mask[..., None]).pow(2).sum().backward()
            return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        finally:
            ModernBertAttention.rotary_inplace = old

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
