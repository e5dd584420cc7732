"""Parity of the Triton attention kernels (forward and backward) with the reference.

Runs on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) through the full
``fastbert.ops.attention(..., backend="triton")`` path, autograd included. Tolerance: STYLE.md's
rule (``assert_close_to_ref``): the kernel against an fp64 reference from the same (upcast)
inputs, at most 2x the error of the reference run in the kernel's own dtype.

bf16: Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 operands, so under the
interpreter the kernels widen bf16 operands to fp32 right before ``tl.dot`` (see ``_dot`` in
the kernel module); every other bf16 line runs as compiled. The compiled bf16 ``tl.dot`` is
covered by the ahead-of-time compile (tests/test_triton_aot_attention.py) and by the
``gpu``-marked parity test here.

The default grid is pairwise-covering over the axes below (every pair of axis values appears in
at least one case); ``-m slow`` runs the full product.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import fastbert.ops as ops
from fastbert.backends._philox import attention_keep_mask, dropout_scale
from _cuda_graph import assert_replay_matches_eager
from _pairwise import covers_every_pair, full_product, pairwise
from _tolerance import assert_close_to_ref, attention_floor_eps

AXES = {
    "head_dim": (32, 40, 64, 80, 96, 128),
    "seqlen": (1, 17, 97, 128, 200),
    "batch": (1, 3),
    "layout": ("padded", "varlen"),
    "bias": (None, "11QK", "B11K", "BHQK"),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "dropout": (0.0, 0.17),
}


def _feasible(case: dict) -> bool:
    # attn_bias is rejected together with cu_seqlens (DESIGN.md).
    return not (case.get("layout") == "varlen" and case.get("bias") is not None)


def _cost(c: dict) -> float:
    # Interpreter work: the score tile per sequence and head (long sequences run with one head).
    return c["seqlen"] ** 2 * c["head_dim"] * c["batch"] * _num_heads(c)


def _case_id(c: dict) -> str:
    return (f"d{c['head_dim']}-L{c['seqlen']}-B{c['batch']}-{c['layout']}-bias{c['bias']}-"
            f"{str(c['dtype']).replace('torch.', '')}-p{c['dropout']}")


def _num_heads(c: dict) -> int:
    # The interpreter is slow: long sequences run with one head, short ones with two.
    return 1 if c["seqlen"] >= 97 else 2


CASES = pairwise(AXES, cost=_cost, overhead=1e7, feasible=_feasible)


def _make_inputs(c: dict, gen: torch.Generator) -> dict:
    """Fresh random inputs for one case (fp64; cast per run). q, k, v are strided views of one
    packed qkv tensor in the padded layout, so the kernels read them in place."""
    batch, seqlen, heads, hd = c["batch"], c["seqlen"], _num_heads(c), c["head_dim"]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    kw = {}
    if c["layout"] == "varlen":
        # Always one zero-length sequence; the longest one has exactly `seqlen` tokens.
        lengths = [seqlen, 0] + [int(x) for x in torch.randint(1, seqlen + 1, (batch - 1,), generator=gen)]
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
        total = int(cu[-1])
        qkv = rnd(total, 3, heads, hd)
        kw.update(cu_seqlens=cu, max_seqlen=seqlen)
    else:
        lengths = [seqlen] + [int(x) for x in torch.randint(1, seqlen + 1, (batch - 1,), generator=gen)]
        qkv = rnd(batch, seqlen, 3, heads, hd)
        kw["attention_mask"] = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
        shape = {"11QK": (1, 1, seqlen, seqlen), "B11K": (batch, 1, 1, seqlen),
                 "BHQK": (batch, heads, seqlen, seqlen)}.get(c["bias"])
        if shape is not None:
            kw["attn_bias"] = rnd(*shape)
    q, k, v = qkv.unbind(-3)
    dev = torch.device(c.get("device", "cpu"))
    kw = {name: t.to(dev) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    return dict(q=q.to(dev), k=k.to(dev), v=v.to(dev), dout=rnd(*q.shape).to(dev), kw=kw,
                dropout_p=c["dropout"], dtype=c["dtype"])


def _run(inp: dict, dtype: torch.dtype, backend: str, seed: int = 1234):
    """out and the gradients of (q, k, v[, attn_bias]) for ``sum(out * dout)``, in ``dtype``."""
    qkv = torch.stack([inp["q"], inp["k"], inp["v"]], dim=-3).to(dtype).requires_grad_()
    q, k, v = qkv.unbind(-3)  # strided views (the padded ones have a head stride of 3 * heads * d)
    kw = dict(inp["kw"])
    leaves = [qkv]
    if "attn_bias" in kw:
        kw["attn_bias"] = kw["attn_bias"].to(dtype).requires_grad_()
        leaves.append(kw["attn_bias"])
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's RNG: same mask in every run
    if q.is_cuda:
        torch.cuda.manual_seed(seed)
    out = ops.attention(q, k, v, dropout_p=inp["dropout_p"], backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, inp["dout"].to(dtype))
    dq, dk, dv = grads[0].unbind(-3)
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv,
            **({"dbias": grads[1]} if len(grads) > 1 else {})}


def _check_parity(c: dict) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(c).encode()))
    inp = _make_inputs(c, gen)
    got = _run(inp, c["dtype"], "triton")
    ref_hi = _run(inp, torch.float64, "reference")
    ref_lo = _run(inp, c["dtype"], "reference")
    assert set(got) == set(ref_hi)
    for name in ref_hi:
        assert_close_to_ref(got[name], ref_hi[name], ref_lo[name], name=name,
                            floor_eps=_floor_eps(name, inp, ref_hi))


def _floor_eps(name: str, inp: dict, ref: dict) -> float:
    """The attention rule's floor (``_tolerance.attention_floor_eps``) for these inputs."""
    return attention_floor_eps(name, ref, dout=inp["dout"], q=inp["q"], k=inp["k"], dtype=inp["dtype"],
                               head_dim=inp["q"].shape[-1], seqlen_k=inp["k"].shape[-3])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_pairwise(case, poison):
    _check_parity(case)


GPU_CASES = [dict(head_dim=hd, seqlen=L, batch=3, layout=layout, bias=bias, dtype=dt, dropout=p, device="cuda")
             for hd, L, layout, bias, dt, p in (
                 (64, 128, "padded", "B11K", torch.float16, 0.1), (64, 200, "varlen", None, torch.bfloat16, 0.0),
                 (128, 97, "padded", "BHQK", torch.bfloat16, 0.1), (40, 513, "padded", "11QK", torch.float16, 0.0),
                 (80, 257, "varlen", None, torch.float16, 0.1), (96, 64, "padded", None, torch.float32, 0.0),
                 (256, 130, "padded", "BHQK", torch.bfloat16, 0.0), (32, 1025, "varlen", None, torch.float32, 0.1))]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_parity_gpu_compiled(case, poison):
    """The compiled kernels (incl. bf16 tl.dot, which the interpreter cannot run) on a GPU."""
    _check_parity(case)


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
@pytest.mark.parametrize("case", full_product(AXES, _feasible), ids=_case_id)
def test_parity_full_product(case, poison):
    _check_parity(case)


def test_pairwise_grid_covers_every_pair():
    assert covers_every_pair(CASES, AXES, _feasible)


@pytest.mark.parametrize("head_dim", (8, 24, 136, 256))
def test_parity_other_head_dims(head_dim, poison):
    """The bucket edges outside the main grid (8 and 24: buckets 16 and 32; 136, 256: bucket 256)."""
    case = dict(head_dim=head_dim, seqlen=19, batch=2, layout="padded", bias="B11K", dtype=torch.float16,
                dropout=0.0)
    _check_parity(case)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_parity_cross_lengths(dtype, poison):
    """seqlen_q != seqlen_k (padded layout), full bias with gradient, mask, dropout."""
    gen = torch.Generator().manual_seed(3)
    batch, seqlen_q, seqlen_k, heads, hd = 2, 21, 45, 2, 40
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inp = dict(q=rnd(batch, seqlen_q, heads, hd), k=rnd(batch, seqlen_k, heads, hd),
               v=rnd(batch, seqlen_k, heads, hd), dout=rnd(batch, seqlen_q, heads, hd), dropout_p=0.2,
               dtype=dtype, kw=dict(attention_mask=torch.arange(seqlen_k)[None, :] < torch.tensor([[45], [30]]),
                                    attn_bias=rnd(batch, heads, seqlen_q, seqlen_k)))

    def run(dt, backend):
        leaves = [inp[n].to(dt).requires_grad_() for n in ("q", "k", "v")]
        bias = inp["kw"]["attn_bias"].to(dt).requires_grad_()
        torch.manual_seed(11)
        out = ops.attention(*leaves, attention_mask=inp["kw"]["attention_mask"], attn_bias=bias,
                            dropout_p=inp["dropout_p"], backend=backend)
        grads = torch.autograd.grad(out, leaves + [bias], inp["dout"].to(dt))
        return dict(zip(("out", "dq", "dk", "dv", "dbias"), (out.detach(),) + grads))

    got, hi, lo = run(dtype, "triton"), run(torch.float64, "reference"), run(dtype, "reference")
    for name in hi:
        assert_close_to_ref(got[name], hi[name], lo[name], name=name, floor_eps=_floor_eps(name, inp, hi))


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


@pytest.mark.parametrize("unpad", (True, False), ids=("varlen", "padded"))
def test_bert_encoder_end_to_end(unpad, monkeypatch, poison):
    """fastbert's BertModel runs with backend="triton" (unpadded: varlen attention; padded: mask)
    and matches the reference backend's fp64 model, forward and backward (STYLE.md: 3x for a
    whole encoder); the Triton attention kernels really ran (counted)."""
    import copy

    import fastbert.backends.triton.attention as tri
    from fastbert.models import BertConfig, BertModel

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = tri.attention_fwd, tri.attention_bwd

    def counted_fwd(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def counted_bwd(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(tri, "attention_fwd", counted_fwd)
    monkeypatch.setattr(tri, "attention_bwd", counted_bwd)
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertModel(config, unpad=unpad, backend="triton").eval()
    ids = torch.randint(1, 99, (3, 13))
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 1, 7])[:, None]).long()

    def run(m, dtype):
        m = m.to(dtype)
        m.zero_grad()
        out = m(input_ids=ids * mask, attention_mask=mask).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        q_grad = m.encoder.layer[0].attention.self.query.weight.grad
        return out.detach(), q_grad.clone()

    got = run(model, torch.float32)
    assert calls["fwd"] == 1 and calls["bwd"] == 1  # one layer
    ref = copy.deepcopy(model)
    ref.backend = "reference"
    lo = run(ref, torch.float32)
    hi = run(ref, torch.float64)
    for name, g, h, l in zip(("last_hidden_state", "query.weight.grad"), got, hi, lo):
        assert_close_to_ref(g, h, l, factor=3.0, floor_eps=16.0, name=name)
