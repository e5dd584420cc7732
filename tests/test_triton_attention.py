"""Parity of the Triton attention kernels (forward and backward) with the reference.

Runs on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) through the full
``fastbert.ops.attention(..., backend="triton")`` path, autograd included, from the one case list
every backend's parity test runs (``_cases_attention.ATTENTION_CASES``; STYLE.md's tolerance rule
with the FlashAttention-2 floor, empty rows exact zeros), plus a few Triton-only points: the bucket
edges 24 and 136, mask + full bias + dropout with seqlen_q != seqlen_k. ``-m slow`` runs the full
product of the grid's axes below (also 128 and 200 keys: whole and many key tiles).

bf16: Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 operands, so under the
interpreter the kernels widen bf16 operands to fp32 right before ``tl.dot`` (see ``_dot`` in
the kernel module); every other bf16 line runs as compiled. The compiled bf16 ``tl.dot`` is
covered by the ahead-of-time compile (tests/test_triton_aot_attention.py) and by the
``gpu``-marked parity test here.
"""

from __future__ import annotations

import random

import pytest
import torch
from _cases import BF16, F16, F32
from _cases_attention import ATTENTION_CASES, AttentionCase, check_attention_case
from _cuda_graph import assert_replay_matches_eager
from _pairwise import full_product
from _tolerance import assert_close_to_ref

import fastbert.ops as ops
from fastbert.backends._philox import attention_keep_mask, dropout_scale

# The full product behind -m slow: every head_dim bucket the kernels tile differently, seqlens
# across one / several key tiles, both layouts, every bias shape, every dtype, dropout on and off.
AXES = {
    "head_dim": (32, 40, 64, 80, 96, 128),
    "seqlen": (1, 17, 97, 128, 200),
    "batch": (1, 3),
    "layout": ("padded", "varlen"),
    "bias": (None, "11QK", "B11K", "BHQK"),
    "dtype": (F32, F16, BF16),
    "dropout": (0.0, 0.17),
}


def _feasible(point: dict) -> bool:
    # attn_bias is rejected together with cu_seqlens (DESIGN.md).
    return not (point["layout"] == "varlen" and point["bias"] is not None)


def _grid_case(head_dim, seqlen, batch, layout, bias, dtype, dropout) -> AttentionCase:
    """One point of the grid as a shared case. Padded: q/k/v strided views of one packed QKV tensor
    with random key lengths (the first sequence full); varlen: one sequence of ``seqlen`` tokens,
    one empty, the rest random. Long sequences run with one head (the interpreter is slow)."""
    heads = 1 if seqlen >= 97 else 2
    if layout == "varlen":
        rng = random.Random(f"{head_dim}-{seqlen}-{batch}-{dtype}-{dropout}")
        lengths = (seqlen, 0) + tuple(rng.randint(1, seqlen) for _ in range(batch - 1))
        return AttentionCase(dtype, head_dim, layout="varlen", lengths=lengths, num_heads=heads, dropout_p=dropout)
    return AttentionCase(dtype, head_dim, seqlen, seqlen, batch=batch, num_heads=heads, layout="packed",
                         mask="lengths", bias=bias, dropout_p=dropout)


# Triton-only points beside the shared list: head_dim 24 (bucket 32) and 136 (bucket 256) off the
# shared list's grid; mask + full bias with gradient + dropout together with seqlen_q != seqlen_k.
TRITON_CASES = (
    AttentionCase(F16, 24, 19, 19, layout="packed", mask="lengths", bias="B11K"),
    AttentionCase(F16, 136, 19, 19, layout="packed", mask="lengths", bias="B11K"),
    AttentionCase(F32, 40, 21, 45, mask="lengths", bias="BHQK", dropout_p=0.2),
)


# Under the interpreter a dropout case costs 2-3x a plain one (the kernels' Philox runs in numpy);
# these three of the shared list's eight dropout cases run behind -m slow here. Every axis value of
# the list (dtype, head_dim, layout, bias shape, dropout per layout) still runs on Triton by default.
TRITON_SLOW = ("bfloat16-d40-h2-padded2x17x97-bias11QK+p0.1", "float32-d64-h1-varlen0_97-p0.2",
               "bfloat16-d64-h2-packed2x33x33-biasB11K+p0.1")


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c), marks=pytest.mark.slow if str(c) in TRITON_SLOW else ())
                                  for c in ATTENTION_CASES + TRITON_CASES])
def test_triton_attention_matches_reference(case, poison):
    check_attention_case(case, "triton", "cpu")


GPU_CASES = tuple(_grid_case(hd, L, 3, layout, bias, dt, p) for hd, L, layout, bias, dt, p in (
    (64, 128, "padded", "B11K", F16, 0.1), (64, 200, "varlen", None, BF16, 0.0),
    (128, 97, "padded", "BHQK", BF16, 0.1), (40, 513, "padded", "11QK", F16, 0.0),
    (80, 257, "varlen", None, F16, 0.1), (96, 64, "padded", None, F32, 0.0),
    (256, 130, "padded", "BHQK", BF16, 0.0), (32, 1025, "varlen", None, F32, 0.1)))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_parity_gpu_compiled(case, poison):
    """The compiled kernels (incl. bf16 tl.dot, which the interpreter cannot run) on a GPU."""
    check_attention_case(case, "triton", "cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_replay():
    """Forward and backward launch without host syncs: capture in a CUDA graph, replay, compare."""
    gen = torch.Generator().manual_seed(12)
    q, k, v, dout = (torch.randn(2, 77, 4, 64, generator=gen).half().cuda() for _ in range(4))
    mask = (torch.arange(77)[None, :] < torch.tensor([[77], [40]])).cuda()
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        out = ops.attention(q, k, v, attention_mask=mask, backend="triton")
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    assert_replay_matches_eager(step, names=("out", "dq", "dk", "dv"), what="attention triton")


@pytest.mark.slow
@pytest.mark.parametrize("case", [_grid_case(**p) for p in full_product(AXES, _feasible)], ids=str)
def test_parity_full_product(case, poison):
    check_attention_case(case, "triton", "cpu")


def _lse(q, k, v, backend, **kw):
    """(out, logsumexp) straight from the forward custom op (the public API returns only out);
    the op's lse holds two planes (row max m, log l), whose sum is the logsumexp."""
    args = dict(attention_mask=None, attn_bias=None, cu_seqlens=None, seed=None, max_seqlen=0,
                dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, allow_tf32=False, deterministic=False)
    args.update(kw)
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, args["attention_mask"], args["attn_bias"],
                                                args["cu_seqlens"], args["seed"], args["max_seqlen"],
                                                args["dropout_p"], args["softmax_scale"], args["allow_tf32"],
                                                args["deterministic"], backend)
    return out, lse[0] + lse[1]


def test_empty_rows_zero_output_zero_grads_lse_inf(poison):
    """A row with no key (all keys masked, or every key biased -inf) returns zeros, lse = +inf,
    zero gradients, and no NaN anywhere; the other rows still match the reference."""
    gen = torch.Generator().manual_seed(5)
    batch, seqlen, heads, hd = 3, 23, 2, 32
    q, k, v, dout = (torch.randn(batch, seqlen, heads, hd, generator=gen) for _ in range(4))
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[1] = False  # sequence 1: every key is padding -> every row of it is empty
    mask[2, 10:] = False
    bias = torch.randn(batch, heads, seqlen, seqlen, generator=gen)
    bias[2, 1, 4, :] = float("-inf")  # one row with every key biased away
    bias[0, 0, :, 3] = float("-inf")  # one key excluded for a whole head (rows still have keys)
    bias[2, 0, 7, :10] = float("-inf")  # with the mask, row 7 of head 0 has no key either
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = ops.attention(*leaves[:3], attention_mask=mask, attn_bias=leaves[3], backend=backend)
        results[backend] = (out.detach(),) + torch.autograd.grad(out, leaves, dout)
    got, ref = results["triton"], results["reference"]
    for name, g, r in zip(("out", "dq", "dk", "dv", "dbias"), got, ref):
        assert not torch.isnan(g).any(), name
        assert_close_to_ref(g, r, name=name, floor_eps=16.0)
    out, dq, _, _, dbias = got
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dbias[1] == 0).all()
    assert (out[2, 4, 1] == 0).all() and (dq[2, 4, 1] == 0).all() and (dbias[2, 1, 4] == 0).all()
    assert (out[2, 7, 0] == 0).all() and (dq[2, 7, 0] == 0).all()
    _, lse = _lse(q, k, v, "triton", attention_mask=mask, attn_bias=bias)
    _, lse_ref = _lse(q, k, v, "reference", attention_mask=mask, attn_bias=bias)
    assert torch.isinf(lse[1]).all() and lse[2, 1, 4] == float("inf") and lse[2, 0, 7] == float("inf")
    torch.testing.assert_close(lse, lse_ref)


def test_lse_varlen_matches_reference(poison):
    """lse [num_heads, total_tokens] in the varlen layout, incl. a zero-length sequence."""
    gen = torch.Generator().manual_seed(6)
    cu = torch.tensor([0, 9, 9, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, 2, 64, generator=gen) for _ in range(3))
    out, lse = _lse(q, k, v, "triton", cu_seqlens=cu, max_seqlen=31)
    out_ref, lse_ref = _lse(q, k, v, "reference", cu_seqlens=cu, max_seqlen=31)
    assert lse.shape == (2, 40)
    torch.testing.assert_close(lse, lse_ref)
    torch.testing.assert_close(out, out_ref)


def test_dropout_same_seed_same_result_and_mask_is_the_shared_scheme(poison):
    """Same torch seed -> identical output and gradients; another seed -> another mask. The mask
    read back from the output (V = identity, uniform scores) is exactly the shared Philox mask,
    and its keep rate is within 5 sigma of 1 - p."""
    from fastbert.ops._common import draw_seed

    batch, heads, seqlen, p = 2, 2, 64, 0.3
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(batch, seqlen, heads, seqlen, generator=gen) for _ in range(2))
    v = torch.eye(seqlen).expand(batch, heads, seqlen, seqlen).transpose(1, 2).contiguous()  # v[b, j, h] = e_j
    dout = torch.randn(batch, seqlen, heads, seqlen, generator=gen)

    def run(seed):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out = ops.attention(*leaves, dropout_p=p, softmax_scale=0.0, backend="triton")
        return (out.detach(),) + torch.autograd.grad(out, leaves, dout)

    a, b, c = run(21), run(21), run(22)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # Uniform probabilities 1/seqlen: out[b, i, h, j] = keep[b, h, i, j] * dropout_scale(p) / seqlen.
    keep = (a[0] > 0).permute(0, 2, 1, 3)
    torch.manual_seed(21)
    expected = attention_keep_mask(draw_seed(torch.device("cpu")), p, batch, heads, seqlen, seqlen)
    assert torch.equal(keep, expected)
    torch.testing.assert_close(a[0][a[0] > 0], torch.full_like(a[0][a[0] > 0], dropout_scale(p) / seqlen))
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma


def test_deterministic_flag(poison):
    """With torch's deterministic mode on, the backend takes the call ("deterministic" declared)
    and gradients are bitwise reproducible and equal to the default mode's (no atomics anywhere)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v, dout = (torch.randn(2, 33, 2, 32, generator=gen, dtype=torch.float16) for _ in range(4))
    bias = torch.randn(1, 2, 1, 33, generator=gen, dtype=torch.float16)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = ops.attention(*leaves[:3], attn_bias=leaves[3], backend="triton")
        return torch.autograd.grad(out, leaves, dout)

    default = grads()
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(old)
    for x, y, z in zip(first, second, default):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_opcheck_attention_fwd():
    """torch.library.opcheck on the forward custom op with the Triton backend (tiny case):
    schema, fake tensor, autograd registration and AOT dispatch."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True, True, True, False, True]])
    bias = torch.randn(1, 2, 5, 5, generator=gen).requires_grad_()
    seed = torch.tensor([12345, 678], dtype=torch.int64)
    args = (q, k, v, mask, bias, None, seed, 0, 0.25, 0.25, False, False, "triton")
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)


def test_capabilities_declared_honestly():
    from fastbert.backends import get_backend
    from fastbert.backends.triton import ATTENTION_HEAD_DIMS

    caps = get_backend("triton").caps["attention"]
    assert {"attention_mask", "attn_bias", "attn_bias_grad", "varlen", "dropout", "deterministic",
            "tf32"} <= caps.features
    assert all(caps.head_dims(d) for d in ATTENTION_HEAD_DIMS) and not caps.head_dims(26)
