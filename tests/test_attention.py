"""fastbert.ops.attention: the reference against independent implementations, the torch backend
against the reference, empty rows, masks, dropout, varlen, validation errors, custom-op checks."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from _cases_attention import ANY_HEAD_DIM_CASES, ATTENTION_CASES, UNMASKED_CASES, check_attention_case
from _custom_op_path import output_and_grads
from _tolerance import EPS, assert_close_to_ref

from fastbert.backends._philox import attention_keep_mask
from fastbert.ops import attention

CPU_BACKENDS = ("reference", "torch")


def _qkv(batch, seqlen_q, seqlen_k, num_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda L: torch.randn(batch, L, num_heads, head_dim, generator=g, dtype=torch.float64)  # noqa: E731
    return [t.to(dtype) for t in (mk(seqlen_q), mk(seqlen_k), mk(seqlen_k))]


def _mask(batch, seqlen_k, seed=0, empty_row=False):
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, seqlen_k + 1, (batch,), generator=g)
    if empty_row:
        lengths[0] = 0
    return torch.arange(seqlen_k)[None, :] < lengths[:, None]  # bool [B, Lk]


def _sdpa_math(q, k, v, mask=None, bias=None, scale=None):
    """Independent implementation: SDPA's math backend with a bool mask (rows with a key only)."""
    attn = None
    if mask is not None:
        attn = mask[:, None, None, :].expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if bias is not None:
        b = bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        attn = b if attn is None else b.masked_fill(~attn, float("-inf"))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn, scale=scale)
    return out.transpose(1, 2)


# ---------------------------------------------------------------- the reference is independent

@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,num_heads,head_dim", [
    (1, 1, 1, 1, 26), (3, 7, 7, 2, 32), (2, 97, 97, 3, 40), (3, 7, 13, 2, 64), (1, 17, 17, 2, 80),
    (2, 7, 7, 1, 96), (1, 9, 9, 2, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_sdpa_math(batch, seqlen_q, seqlen_k, num_heads, head_dim, with_bias):
    q, k, v = (t.requires_grad_() for t in _qkv(batch, seqlen_q, seqlen_k, num_heads, head_dim, torch.float64))
    mask = _mask(batch, seqlen_k)
    bias = torch.randn(batch, 1, seqlen_q, seqlen_k, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = attention(q, k, v, attention_mask=mask, attn_bias=bias, backend="reference")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v] + ([bias] if with_bias else []), dout)
    ref = _sdpa_math(q, k, v, mask, bias)
    ref_grads = torch.autograd.grad(ref, [q, k, v] + ([bias] if with_bias else []), dout)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_reference_varlen_matches_per_sequence_loop():
    lengths = [5, 0, 1, 9]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    total, heads, hd = sum(lengths), 2, 16
    q, k, v = (torch.randn(total, heads, hd, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, cu_seqlens=cu, backend="reference")
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            parts.append(_sdpa_math(q[None, a:b], k[None, a:b], v[None, a:b])[0])
    torch.testing.assert_close(out, torch.cat(parts), atol=1e-12, rtol=1e-12)
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [q, k, v], dout)
    g2 = torch.autograd.grad(torch.cat(parts), [q, k, v], dout)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_reference_gradcheck_fp64():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 4, 2, 5, torch.float64))
    mask = _mask(2, 4, empty_row=False)
    bias = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, b: attention(q, k, v, attention_mask=mask, attn_bias=b, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, bias))


# ---------------------------------------------------------------- the torch backend vs reference

@pytest.mark.parametrize("case", ATTENTION_CASES + ANY_HEAD_DIM_CASES + UNMASKED_CASES, ids=str)
def test_torch_backend_matches_reference(case, poison):
    """The one case list (``_cases_attention``) and the fp64 / any-head_dim extras, with the
    kernels' FlashAttention-2 floor: the torch backend's padded and varlen backward without dropout
    or bias is aten's CPU flash backward (``D = rowsum(dO * O)`` cancels against ``dO V^T``)."""
    check_attention_case(case, "torch", "cpu", flash_floor=True)


def test_unmasked_eager_backward_matches_custom_op_path_and_sees_inplace_edits(poison):
    """The unmasked eager call's backward reads the forward's heads-first views of q, k, v and out
    (carried by its statistics): the same output and gradients as the custom op's path (which
    recomputes through the composite backward) on strided QKV views, and an in-place edit of q
    after the forward still fails autograd's version check (the views are no way around it)."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 11, 3, 3, 16, generator=g)

    def dy(y):
        return torch.randn(y.shape, generator=torch.Generator().manual_seed(6))

    eager, traced = (output_and_grads(lambda t: attention(*t.unbind(2)), [qkv], dy, mode) for mode in (False, True))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    leaf = torch.randn(1, 8, 2, 16, generator=g, requires_grad=True)
    q = leaf * 1.0
    out = attention(q, leaf, leaf)
    q.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_matches_padded(backend):
    batch, seqlen, heads, hd = 3, 11, 2, 16
    q, k, v = _qkv(batch, seqlen, seqlen, heads, hd, torch.float32)
    mask = _mask(batch, seqlen, seed=3)
    mask[1] = False  # an empty sequence
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    # Varlen packs the first `length` tokens of each sequence: padded queries beyond it are dropped.
    packed = [t[mask] for t in (q, k, v)]
    out_p = attention(q, k, v, attention_mask=mask, backend=backend)[mask]
    out_v = attention(*packed, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(out_v, out_p, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- empty rows, masks, dropout

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows_zero_output_and_grads(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 5, 5, 2, 8, torch.float32))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False  # sequence 0 has no key at all
    bias = torch.zeros(2, 2, 5, 5)
    bias[1, 0, 2, :] = float("-inf")  # one row of sequence 1, head 0, excluded by the bias
    bias.requires_grad_()
    out = attention(q, k, v, attention_mask=mask, attn_bias=bias, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, 2, 0], torch.zeros_like(out[1, 2, 0]))
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, bias])
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    assert torch.equal(grads[0][1, 2, 0], torch.zeros_like(grads[0][1, 2, 0]))


def test_finfo_min_bias_row_averages_v():
    """A bias of finfo.min is finite: such a row averages V (Hugging Face's eager behaviour)."""
    q, k, v = _qkv(1, 3, 4, 1, 8, torch.float32)
    bias = torch.full((1, 1, 3, 4), torch.finfo(torch.float32).min)
    out = attention(q, k, v, attn_bias=bias, backend="reference")
    torch.testing.assert_close(out[0, :, 0], v[0, :, 0].mean(0).expand(3, 8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_bool_and_int64_identical(backend):
    q, k, v = _qkv(3, 6, 6, 2, 8, torch.float32)
    mask = _mask(3, 6, seed=5)
    a = attention(q, k, v, attention_mask=mask, backend=backend)
    b = attention(q, k, v, attention_mask=mask.to(torch.int64), backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_same_seed_same_result_and_keep_rate(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 64, 64, 2, 16, torch.float32))
    torch.manual_seed(123)
    a = attention(q, k, v, dropout_p=0.25, backend=backend)
    ga = torch.autograd.grad(a.sum(), [q, k, v])
    torch.manual_seed(123)
    b = attention(q, k, v, dropout_p=0.25, backend=backend)
    gb = torch.autograd.grad(b.sum(), [q, k, v])
    assert torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)
    torch.manual_seed(124)
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.25, backend=backend))
    keep = attention_keep_mask(torch.tensor([5, 9]), 0.25, 4, 4, 64, 64)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - 0.75) < 5 * math.sqrt(0.25 * 0.75 / n)  # 5 sigma


def test_dropout_masks_equal_across_padded_and_varlen_layouts():
    """Same seed -> same mask for the padded and varlen layouts (counters are logical positions)."""
    batch, seqlen, heads, hd = 2, 6, 2, 8
    q, k, v = _qkv(batch, seqlen, seqlen, heads, hd, torch.float64)
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[1, 4:] = False
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    torch.manual_seed(9)
    out_p = attention(q, k, v, attention_mask=mask, dropout_p=0.5, backend="reference")
    torch.manual_seed(9)
    # Sequence 1 has 4 tokens: in the padded layout keys 4, 5 are masked, so rows see the same keys.
    out_v = attention(*(t[mask] for t in (q, k, v)), cu_seqlens=cu, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(out_v, out_p[mask], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_parity_with_reference(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 9, 9, 2, 8, torch.float64))
    mask = _mask(2, 9, seed=2)
    torch.manual_seed(5)
    a = attention(q, k, v, attention_mask=mask, dropout_p=0.3, backend=backend)
    torch.manual_seed(5)
    b = attention(q, k, v, attention_mask=mask, dropout_p=0.3, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_empty_inputs_return_empty():
    q = torch.randn(0, 5, 2, 8, requires_grad=True)
    out = attention(q, q, q)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape
    qv = torch.randn(0, 2, 8)
    assert attention(qv, qv, qv, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)).shape == qv.shape


def test_strided_views_read_in_place():
    x = torch.randn(2, 7, 3 * 2 * 16)  # a fused QKV projection output
    q, k, v = x.view(2, 7, 3, 2, 16).unbind(2)
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="torch")
    ref = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- validation

def test_bad_inputs_raise_naming_the_argument():
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="num_heads"):
        attention(q, torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(batch, seqlen_k\) = \(2, 5\), got \(2, 4\)"):
        attention(q, q, q, attention_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="expected dtype"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="k, v: expected q's dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="attn_bias: expected a shape broadcastable"):
        attention(q, q, q, attn_bias=torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
    qv = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask: must be None with cu_seqlens"):
        attention(qv, qv, qv, cu_seqlens=cu, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attn_bias: not supported with cu_seqlens"):
        attention(qv, qv, qv, cu_seqlens=cu, attn_bias=torch.zeros(1))
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype"):
        attention(qv, qv, qv, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"cu_seqlens: expected cu_seqlens\[-1\] == total_tokens == 6, got 5"):
        attention(qv, qv, qv, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(qv, qv, qv, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen"):
        attention(qv, qv, qv, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="backend: expected one of"):
        attention(q, q, q, backend="nope")


# ---------------------------------------------------------------- custom op / compile / autocast

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 4, 2, 8, torch.float32))
    mask = _mask(2, 4)
    bias = torch.randn(1, 2, 4, 4, requires_grad=True)
    args = (q, k, v, mask, bias, None, torch.tensor([1, 2]), 0, 0.1, 0.35, False, False, backend)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)


def test_compile_fullgraph_matches_eager():
    q, k, v = _qkv(2, 5, 5, 2, 8, torch.float32)
    mask = _mask(2, 5)
    f = lambda q, k, v: attention(q, k, v, attention_mask=mask, backend="torch")  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_autocast_runs_in_autocast_dtype():
    q, k, v = _qkv(2, 5, 5, 2, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert_close_to_ref(out, attention(q, k, v, backend="reference"),
                        attention(*(t.bfloat16() for t in (q, k, v)), backend="reference"))


def test_additive_or_non_binary_mask_is_an_error():
    q = torch.randn(2, 4, 2, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask: expected 0/1 or bool values.*attn_bias"):
        attention(q, q, q, attention_mask=(1 - mask.float()) * -10000.0)
    with pytest.raises(ValueError, match="attention_mask: expected 0/1"):
        attention(q, q, q, attention_mask=mask * 2)
    # a fractional entry is named with its value and index, not hidden inside the [min, max] range
    frac = mask.float()
    frac[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"got 0\.5 at \[1, 2\] \(1 of 8 entries not 0/1"):
        attention(q, q, q, attention_mask=frac)
    # 0/1 floats are a padding mask like any other
    torch.testing.assert_close(attention(q, q, q, attention_mask=mask.float()),
                               attention(q, q, q, attention_mask=mask.bool()))


def test_non_finite_softmax_scale_is_an_error():
    q = torch.randn(1, 3, 2, 8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale: expected a finite number"):
            attention(q, q, q, softmax_scale=bad)


def test_empty_varlen_batch():
    e = torch.randn(0, 2, 8)
    assert attention(e, e, e, cu_seqlens=torch.tensor([0], dtype=torch.int32), max_seqlen=0).shape == (0, 2, 8)


# ---------------------------------------------------------------- issue #12 regressions (every CPU backend)

ALL_CPU_BACKENDS = ("reference", "torch", "triton", "cuda-host")


def _require(backend):
    from fastbert.backends import get_backend

    reason = get_backend(backend).unavailable_reason("attention")
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _fwd_bwd(backend, q, k, v, dout, **kw):
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    bias = kw.pop("attn_bias", None)
    if bias is not None:
        bias = bias.detach().requires_grad_()
    out = attention(*xs, attn_bias=bias, backend=backend, **kw)
    grads = torch.autograd.grad(out, xs + ([bias] if bias is not None else []), dout.to(out.dtype))
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_strided_cu_seqlens_is_read_through_its_strides(backend, poison):
    """#12.1: a strided cu_seqlens view passes the value checks (.tolist() honours strides); the
    kernels read raw memory (triton was off by 2.46, cuda-host by 6e28; [0, 100000, ...][::2]
    crashed cuda-host). fastbert.ops hands every backend a contiguous copy."""
    _require(backend)
    cu = torch.tensor([0, 0, 3, 3, 7, 7], dtype=torch.int32)[::2]
    assert not cu.is_contiguous()
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(7, 2, 16, generator=g) for _ in range(4))
    got = _fwd_bwd(backend, q, k, v, dout, cu_seqlens=cu)
    ref = _fwd_bwd("reference", *(t.double() for t in (q, k, v, dout)), cu_seqlens=cu.contiguous())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close_to_ref(a, b, name=name, floor_eps=64.0)


# (q dtype, bias dtype, bias value of the special row): Hugging Face's fp32 finfo.min mask, bf16's,
# fp16 q with an fp32 -1e5 bias (HF's style), fp16's own finfo.min, an fp64 finfo.min beside fp32 q.
_SPECIAL_ROWS = [(torch.bfloat16, torch.bfloat16, "min"), (torch.float32, torch.float32, "min"),
                 (torch.float16, torch.float32, -1e5), (torch.float16, torch.float16, "min"),
                 (torch.bfloat16, torch.float32, "min"), (torch.float32, torch.float64, "min"),
                 (torch.float16, torch.bfloat16, "min")]


@pytest.mark.parametrize("qdt,bdt,value", _SPECIAL_ROWS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_rows_all_biased_finfo_min_follow_one_rule(backend, qdt, bdt, value, poison):
    """#12.3: a row whose keys are all biased finfo.min (or -1e5) is the exact softmax of its finite
    scores, forward and backward, on every backend and the reference (before: zeros on triton /
    cuda-host for bf16, triton for fp32; NaN from the reference and zeros from torch / triton for
    fp16 q with an fp32 -1e5 bias; backward P = 1 instead of 1/n where m + log(l) == m)."""
    _require(backend)
    if backend in ("triton", "cuda-host") and bdt == torch.float64 and qdt == torch.float64:
        pytest.skip("no fp64 kernels")
    g = torch.Generator().manual_seed(5)
    lq, lk, heads, hd = 4, 6, 2, 16
    q, k, v, dout = (torch.randn(2, n, heads, hd, generator=g, dtype=torch.float64).to(qdt).double()
                     for n in (lq, lk, lk, lq))
    bias = torch.randn(2, heads, lq, lk, generator=g, dtype=torch.float64).to(bdt)
    bias[0, 1, 2] = torch.finfo(bdt).min if value == "min" else value  # one special row
    bias[1, :, 1:3] = torch.finfo(bdt).min if value == "min" else value  # two special rows per head
    got = _fwd_bwd(backend, q.to(qdt), k.to(qdt), v.to(qdt), dout.to(qdt), attn_bias=bias)
    hi = _fwd_bwd("reference", q, k, v, dout, attn_bias=bias.double())
    lo = _fwd_bwd("reference", q.to(qdt), k.to(qdt), v.to(qdt), dout.to(qdt), attn_bias=bias)
    for name, a, h, l in zip(("out", "dq", "dk", "dv", "dbias"), got, hi, lo):
        # dbias takes the bias's dtype, its error the computation's (q's dtype)
        scale = EPS[qdt] / EPS[bdt] if name == "dbias" else 1.0
        assert_close_to_ref(a, h, l, name=name, floor_eps=16.0 * max(1.0, scale))
    if value == "min" and bdt != torch.float16:  # equal scores in fp32: the row averages V exactly
        torch.testing.assert_close(got[0][0, 2, 1].double(), v[0, :, 1].mean(0), atol=4e-3, rtol=0)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_in_masked_keys_do_not_leak(backend, dtype, poison):
    """#12.4: NaN / Inf held in masked-out K and V rows (and in the bias there) has no influence:
    output and gradients equal the run with clean values there, bit for bit (before: the torch
    backend's whole output was NaN for a NaN key; every backend NaN for a NaN value)."""
    _require(backend)
    g = torch.Generator().manual_seed(9)
    q, k, v, dout = (torch.randn(2, 7, 2, 16, generator=g).to(dtype) for _ in range(4))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    bias = torch.randn(2, 1, 1, 7, generator=g)
    bad = ~mask[:, :, None, None]
    kp = torch.where(bad, float("nan"), k)
    vp = torch.where(bad, float("inf"), v)
    vp[1, 6] = float("nan")
    bp = torch.where(~mask[:, None, None, :], float("nan"), bias)
    clean = _fwd_bwd(backend, q, k, v, dout, attention_mask=mask, attn_bias=bias)
    dirty = _fwd_bwd(backend, q, kp, vp, dout, attention_mask=mask, attn_bias=bp)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), dirty, clean):
        assert not a.isnan().any(), f"{name}: NaN leaked from a masked position"
        if name == "dbias":
            a, b = a[mask[:, None, None, :]], b[mask[:, None, None, :]]
        assert torch.equal(a, b), f"{name}: masked positions influenced the result"
    assert torch.equal(dirty[2][bad.expand_as(k)], torch.zeros_like(k)[bad.expand_as(k)])  # dk of masked keys


def test_reference_low_precision_bias_path_is_exact():
    """#12.7: the reference computed an fp16 additive-bias path in fp16 (error 1.47 vs fp64; NaN for
    an fp32 -1e5 row beside fp16 q). It accumulates in fp32 now: only P is rounded to fp16."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 2, 32, generator=g).half() for _ in range(3))
    bias = (1000 * torch.randn(2, 2, 9, 9, generator=g) - 5000).half()  # big scores + bias
    out = attention(q, k, v, attn_bias=bias, backend="reference")
    ref = attention(q.double(), k.double(), v.double(), attn_bias=bias.double(), backend="reference")
    assert (out.double() - ref).abs().max().item() < 8 * 2**-10 * max(1.0, ref.abs().max().item())
    big = torch.full((2, 2, 9, 9), -1e5)  # fp32 bias beside fp16 q: finite scores, no NaN
    out = attention(q, k, v, attn_bias=big, backend="reference")
    ref = attention(q.double(), k.double(), v.double(), attn_bias=big.double(), backend="reference")
    assert not out.isnan().any()
    assert (out.double() - ref).abs().max().item() < 0.02  # fp32 rounding of s - 1e5: ulp 2**-7


def test_torch_backend_broadcast_bias_is_read_in_place():
    """#12.8: a broadcast attn_bias [1, 1, 1, L] made the torch backend allocate O(L^2) (56 / 224 /
    896 MiB above the inputs at L = 1024 / 2048 / 4096, batch 2, 4 heads) where a mask stays flat.
    Peak RSS growth of one call in a fresh process (ru_maxrss), against the same call with a mask."""
    import subprocess
    import sys

    code = """
import resource, torch
from fastbert.ops import attention
L, B, H = 2048, 1, 2
q = torch.randn(B, L, H, 8)
bias = torch.zeros(1, 1, 1, L); bias[..., -100:] = float("-inf")
with torch.no_grad():
    attention(q[:, :8], q[:, :8], q[:, :8], attn_bias=bias[..., :8], backend="torch")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attention(q, q, q, attn_bias=bias, backend="torch")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout.split()[-1])
    # Before the fix: an L x L bool and an fp32 L x L bias per (batch, head), ~40 MiB here.
    assert grown_kib < 16 * 1024, f"bias [1,1,1,L]: peak RSS grew {grown_kib / 1024:.1f} MiB"


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_unclear_errors_name_the_argument(backend):
    """#12.9: meta tensors raised 'unknown device type for autocast'; max_seqlen = 2**31 on
    cuda-host named 'seqlen_q, seqlen_k'."""
    _require(backend)
    qm = torch.empty(1, 4, 1, 16, device="meta")
    with pytest.raises(ValueError, match=r"q: expected a tensor on one of \['cpu', 'cuda'\], got device meta"):
        attention(qm, qm, qm, backend=backend)
    qv = torch.randn(4, 1, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen: expected an int >= 0, got -1"):
        attention(qv, qv, qv, cu_seqlens=cu, max_seqlen=-1, backend=backend)
    with pytest.raises(TypeError, match="max_seqlen: expected an int, got float"):
        attention(qv, qv, qv, cu_seqlens=cu, max_seqlen=4.0, backend=backend)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_max_seqlen_is_an_upper_bound(backend):
    """As in FlashAttention's varlen API, max_seqlen bounds the lengths: any bound >= the longest
    sequence (even above total_tokens: a fixed bound under torch.compile) gives the outputs and
    gradients of the exact one (found by the new-user pass: 100 with 13 tokens raised)."""
    _require(backend)
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    leaves = [torch.randn(13, 2, 16, generator=g, dtype=torch.float64 if backend == "reference" else torch.float32)
              .requires_grad_() for _ in range(3)]
    dout = torch.randn(13, 2, 16, generator=g, dtype=leaves[0].dtype)
    results = []
    for bound in (8, 11, 13, 100, 2**31):
        out = attention(*leaves, cu_seqlens=cu, max_seqlen=bound, backend=backend)
        grads = torch.autograd.grad(out, leaves, dout)
        results.append((out.detach(),) + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_unmasked_backward_survives_a_saved_tensor_hook_that_copies():
    """Offloading / compressing hooks hand the backward copies of what the forward saved: nothing
    the backward needs may ride on a saved tensor's Python attributes."""
    g = torch.Generator().manual_seed(11)
    q, k, v, dy = (torch.randn(2, 9, 3, 8, generator=g) for _ in range(4))
    want = None
    for hook in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ctx = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hook
               else contextlib.nullcontext())
        with ctx:
            out = attention(*leaves, backend="torch")
        got = [out] + list(torch.autograd.grad(out, leaves, dy))
        if want is None:
            want = got
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
