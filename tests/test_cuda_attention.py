"""CUDA attention kernels (csrc/attention_fwd.cu, csrc/attention_bwd.cu) vs the reference: on the
CPU through ``cuda-host`` (the same kernel source under the fiber execution model, with the
tensor-core instructions emulated from their PTX fragment layouts) and on a GPU through ``cuda``,
from the one case list in ``_cases_attention``; plus the exact dropout mask, a planted bug the host run
must catch, and the binding's argument checks.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from _cases import CUDA_BACKENDS, require_backend
from _cases_attention import ATTENTION_CASES, AttentionCase, assert_host_binding_rejects, check_attention_case
from _cuda_graph import assert_replay_matches_eager

from fastbert.backends import get_backend
from fastbert.backends._philox import attention_keep_mask


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_cuda_attention_matches_reference(case, backend, device, poison):
    require_backend(backend, "attention")
    check_attention_case(case, backend, device)


def _sweep_cases(n: int = 40, seed: int = 0) -> list:
    """Seeded random cases over the axes, with tile-boundary seqlens (63/64/65/128/129) and every
    head_dim multiple of 8 bucket edge; the full sweep behind ``-m slow``."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        head_dim = rng.choice([8, 16, 24, 32, 40, 48, 56, 64, 72, 96, 104, 128, 136, 200, 256])
        layout = rng.choice(["padded", "padded", "varlen", "packed", "unaligned"])
        lq = rng.choice([1, 2, 15, 16, 31, 63, 64, 65, 128, 129])
        lk = lq if layout in ("packed", "unaligned") else rng.choice([1, 7, 32, 63, 64, 65, 127, 128, 130])
        kw = dict(num_heads=rng.choice([1, 3]), dropout_p=rng.choice([0.0, 0.0, 0.15]))
        if layout == "varlen":
            lengths = tuple(rng.choice([0, 1, 5, 64, 65, 100]) for _ in range(rng.choice([1, 2, 4])))
            kw["lengths"] = lengths if max(lengths) else lengths + (3,)
        else:
            kw["batch"] = rng.choice([1, 2, 3])
            kw["mask"] = kw["batch"] > 1 and rng.random() < 0.5
            kw["bias"] = rng.choice([None, "11QK", "B11K", "BHQK"])
            kw["bias_fp32"] = kw["bias"] is not None and dtype != torch.float32 and rng.random() < 0.3
        cases.append(AttentionCase(dtype, head_dim, lq, lk, layout=layout, **kw))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("case", _sweep_cases(), ids=str)
def test_cuda_host_attention_sweep(case, poison):
    require_backend("cuda-host", "attention")
    check_attention_case(case, "cuda-host", "cpu")


def _dropout_keep(backend: str, device: str, dtype, p: float = 0.3) -> tuple:
    """The kernel's keep mask, read off the forward with one-hot values (v[key j] = e_j, so
    out[i, :] holds P[i, j] * keep[i, j] / (1 - p) in column j), and the reference's mask."""
    mod = get_backend(backend).load("attention")
    batch, lq, lk, heads, d = 2, 19, 24, 2, 32
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, lq, heads, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, lk, heads, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.eye(lk, d).view(1, lk, 1, d).expand(batch, lk, heads, d).to(device=device, dtype=dtype).contiguous()
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, batch, heads, lq), float("nan"), device=device)
    seed = torch.tensor([0x12345678, 0x9ABCDEF0], dtype=torch.int64, device=device)
    mod.attention_fwd(q, k, v, out, lse, attention_mask=None, attn_bias=None, cu_seqlens=None, max_seqlen=0,
                      dropout_p=p, seed=seed, softmax_scale=1.0 / math.sqrt(d))
    got = (out[..., :lk] != 0).permute(0, 2, 1, 3).cpu()  # [batch, heads, lq, lk]
    return got, attention_keep_mask(seed.cpu(), p, batch, heads, lq, lk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_host_dropout_mask_is_the_reference_mask(dtype):
    require_backend("cuda-host", "attention")
    got, ref = _dropout_keep("cuda-host", "cpu", dtype)
    assert torch.equal(got, ref)
    assert 0.6 < ref.float().mean() < 0.8


@pytest.mark.gpu
def test_cuda_dropout_mask_is_the_reference_mask():
    require_backend("cuda", "attention")
    got, ref = _dropout_keep("cuda", "cuda", torch.float16)
    assert torch.equal(got, ref)


def _dkdv_dropout_keep(backend: str, device: str, dtype, head_dim: int, layout: str, p: float = 0.3) -> tuple:
    """The dK/dV kernel's keep mask, read off dV, and the reference's mask, both
    ``[batch, heads, L, L]``, with a bool ``[batch, 1, 1, L]`` of the keys that carry it.

    With q = 0 every allowed key has P = 1 / (allowed keys) in every row, and with dO one-hot on a
    window of ``head_dim`` query rows (dO[w0 + c] = e_c, 0 elsewhere) dV[j, c] = P[w0 + c, j] *
    keep[w0 + c, j] / (1 - p): dV != 0 is the mask of those rows, one backward per window. Layouts:
    padded with an attention_mask, or varlen (several sequences, one empty)."""
    mod = get_backend(backend).load("attention")
    heads, L = 2, 150
    gen = torch.Generator().manual_seed(3)
    seed = torch.tensor([0x2468ACE0, 0x13579BDF], dtype=torch.int64, device=device)
    lengths = (150, 0, 67, 129) if layout == "varlen" else None
    batch = len(lengths) if lengths else 2
    if lengths:
        cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(batch)], dtype=torch.int32, device=device)
        shape, kw = (sum(lengths), heads, head_dim), dict(attention_mask=None, cu_seqlens=cu, max_seqlen=L)
        allowed = torch.arange(L).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    else:
        allowed = torch.ones(batch, L, dtype=torch.bool)
        allowed[1, torch.randperm(L, generator=gen)[:40]] = False
        shape = (batch, L, heads, head_dim)
        kw = dict(attention_mask=allowed.to(device=device, dtype=torch.uint8), cu_seqlens=None, max_seqlen=0)
    q = torch.zeros(shape, device=device, dtype=dtype)
    k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, heads, shape[0]) if lengths else (2, batch, heads, L), float("nan"), device=device)
    common = dict(attn_bias=None, dropout_p=p, seed=seed, softmax_scale=1.0 / math.sqrt(head_dim), **kw)
    mod.attention_fwd(q, k, v, out, lse, **common)
    got = torch.zeros(batch, heads, L, L, dtype=torch.bool)  # [b, h, query, key]
    for w0 in range(0, L, head_dim):
        eye = torch.zeros(L, head_dim)
        rows = min(head_dim, L - w0)
        eye[w0:w0 + rows] = torch.eye(head_dim)[:rows]
        if lengths:  # each sequence's rows w0.. of its own positions
            dout = torch.cat([eye[:n] for n in lengths]).view(-1, 1, head_dim).expand(shape)
        else:
            dout = eye.view(1, L, 1, head_dim).expand(shape)
        dout = dout.to(device=device, dtype=dtype).contiguous()
        dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
        mod.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, None, **common)
        assert not (dq.isnan().any() or dk.isnan().any() or dv.isnan().any())
        nz = (dv != 0).cpu()
        if lengths:
            for b, (s, n) in enumerate(zip(cu.tolist(), lengths)):  # dv [tokens, heads, c] -> [h, c, key]
                got[b, :, w0:w0 + rows, :n] = nz[s:s + n, :, :rows].permute(1, 2, 0)
        else:
            got[:, :, w0:w0 + rows] = nz[:, :, :, :rows].permute(0, 2, 3, 1)
    ref = attention_keep_mask(seed.cpu(), p, batch, heads, L, L, lengths=lengths)
    return got, ref, allowed.view(batch, 1, 1, L)


@pytest.mark.parametrize("dtype,head_dim,layout", [(torch.float16, 64, "padded"), (torch.bfloat16, 64, "varlen"),
                                                   (torch.float32, 32, "padded"), (torch.float16, 128, "varlen")],
                         ids=str)
def test_cuda_host_dkdv_dropout_mask_is_the_reference_mask(dtype, head_dim, layout):
    """The dK/dV kernel shares each Philox call's keep bits between the 8 lanes holding its keys
    (shuffles): its mask, read off dV at every (query, key) of 150 x 150 (several 8-key groups, warps,
    key blocks and query tiles; 64-query tiles at fp16 d=64, 32-query tiles otherwise), must equal the
    reference's on every allowed key, so a word or bit read from the wrong lane fails here."""
    require_backend("cuda-host", "attention")
    got, ref, allowed = _dkdv_dropout_keep("cuda-host", "cpu", dtype, head_dim, layout)
    if layout == "varlen":  # rows past a sequence's length carry nothing
        allowed = allowed & allowed.transpose(-1, -2)
    assert torch.equal(got & allowed, ref & allowed)
    assert not (got & ~allowed).any()
    assert 0.6 < ref[allowed.expand_as(ref)].float().mean() < 0.8


@pytest.mark.parametrize("case", [AttentionCase(torch.float16, 64, 17, 17),
                                  AttentionCase(torch.float32, 40, 17, 33, batch=1)], ids=str)
def test_cuda_host_planted_key_bound_bug_is_caught(case, monkeypatch):
    """FASTBERT_CUDA_FAULT=1 lets key seqlen_k through the key-tile bound (an off-by-one): the
    host run must fail parity, or the harness could not catch such a bug."""
    require_backend("cuda-host", "attention")
    check_attention_case(case, "cuda-host", "cpu")  # clean run passes
    monkeypatch.setenv("FASTBERT_CUDA_FAULT", "1")
    with pytest.raises(AssertionError):
        check_attention_case(case, "cuda-host", "cpu")


@pytest.mark.parametrize("override,message", [
    (dict(q=0), "q: expected a non-null pointer"),
    (dict(out=0), "out: expected a non-null pointer"),
    (dict(lse=2), "lse: expected a pointer aligned to 4 bytes"),
    (dict(batch=0), "batch: expected > 0"),
    (dict(seqlen_k=-1), "seqlen_k: expected > 0"),
    (dict(head_dim=12), "head_dim: expected a multiple of 8 in [8, 256]"),
    (dict(head_dim=264), "head_dim: expected a multiple of 8 in [8, 256]"),
    (dict(k_strides=(32, -8, 8)), "k strides: expected stride_seq >= 0"),
    (dict(dropout_p=0.5), "seed: expected a pointer"),
    (dict(dtype=5), "dtype: expected a dtype code"),
])
def test_cuda_host_binding_rejects_bad_arguments(override, message):
    assert_host_binding_rejects(override, message.replace("[", r"\[").replace("]", r"\]"))


@pytest.mark.gpu
def test_cuda_attention_captures_and_replays_in_a_cuda_graph():
    """Forward and backward (mask, bias with gradient; > 48 KiB of shared memory at head_dim 128)
    capture in a CUDA graph; a replay on new input values equals an eager run bit for bit (the
    backward has no atomics)."""
    require_backend("cuda", "attention")
    from fastbert.ops import attention

    dev, dt = "cuda", torch.float16
    q, k, v = (torch.randn(2, 77, 4, 128, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 1, 77, device=dev, dtype=dt, requires_grad=True)
    mask = torch.rand(2, 77, device=dev) > 0.2
    dout = torch.randn(2, 77, 4, 128, device=dev, dtype=dt)

    def step():
        out = attention(q, k, v, attention_mask=mask, attn_bias=bias, backend="cuda")
        return (out,) + torch.autograd.grad(out, (q, k, v, bias), dout)

    assert_replay_matches_eager(step, refresh=(q,), names=("out", "dq", "dk", "dv", "dbias"), what="attention cuda")


def test_cuda_attention_capabilities_come_from_the_head_dim_list():
    """The backends declare exactly the kernels' head_dim list (cuda/attention.py's HEAD_DIMS), nothing
    else; a head_dim off it is refused with the list in the reason."""
    from fastbert.backends import CallInfo
    from fastbert.backends.cuda.attention import HEAD_DIMS

    for name in ("cuda-host", "cuda"):
        caps = get_backend(name).caps.get("attention")
        if caps is None:
            pytest.skip(f"{name}: attention not registered")
        assert all(caps.head_dims(d) for d in HEAD_DIMS)
        assert not any(caps.head_dims(d) for d in (4, 12, 26, 264, 512))
    require_backend("cuda-host", "attention")
    call = CallInfo("attention", "cpu", torch.float16, 26, frozenset({"attention_mask"}))
    assert get_backend("cuda-host").reasons(call) == ["head_dim 26 not supported (supports "
                                                      + get_backend("cuda-host").caps["attention"].head_dims_doc + ")"]
