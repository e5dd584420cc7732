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
import random
import zlib

import pytest
import torch

import fastbert.ops as ops
from fastbert.backends._philox import attention_keep_mask
from tests._tolerance import assert_close_to_ref

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


def _pairwise(axes: dict, seed: int = 0) -> list[dict]:
    """A small set of cases covering every feasible pair of axis values (greedy, deterministic)."""
    names = list(axes)
    todo = set()
    for (a, b) in itertools.combinations(range(len(names)), 2):
        for va, vb in itertools.product(range(len(axes[names[a]])), range(len(axes[names[b]]))):
            if _feasible({names[a]: axes[names[a]][va], names[b]: axes[names[b]][vb]}):
                todo.add((a, va, b, vb))
    rng = random.Random(seed)
    cases = []
    while todo:
        a, va, b, vb = min(todo)  # anchor an uncovered pair, fill the other axes greedily
        best, best_gain = None, -1
        for _ in range(60):
            idx = [rng.randrange(len(axes[n])) for n in names]
            idx[a], idx[b] = va, vb
            case = {n: axes[n][i] for n, i in zip(names, idx)}
            if not _feasible(case):
                continue
            gain = sum((x, idx[x], y, idx[y]) in todo for x, y in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = idx, gain
        todo -= {(x, best[x], y, best[y]) for x, y in itertools.combinations(range(len(names)), 2)}
        cases.append({n: axes[n][i] for n, i in zip(names, best)})
    return cases


def _case_id(c: dict) -> str:
    return (f"d{c['head_dim']}-L{c['seqlen']}-B{c['batch']}-{c['layout']}-bias{c['bias']}-"
            f"{str(c['dtype']).replace('torch.', '')}-p{c['dropout']}")


def _num_heads(c: dict) -> int:
    # The interpreter is slow: long sequences run with one head, short ones with two.
    return 1 if c["seqlen"] >= 97 else 2


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
    return dict(q=q, k=k, v=v, dout=rnd(*q.shape), kw=kw, dropout_p=c["dropout"], dtype=c["dtype"])


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
    """The tolerance floor: 4 machine epsilons of the magnitude of the terms that cancel.

    FA2's ``delta = rowsum(dO * O)`` (from the stored, rounded O) cancels against
    ``dP = dO V^T`` inside ``dS = P * (dP - delta)``. Where the true dS is ~0 (seqlen 1: P = 1)
    the kernel keeps a few ulp of ``|delta|`` while the reference, which takes delta from dP
    itself, cancels exactly, so PyTorch's own error is 0 there and only the floor applies. Its
    magnitude is therefore ``|delta|`` for dS (times ``sqrt(n)`` for a broadcast bias's gradient,
    a sum of ``n`` entries) and ``softmax_scale * |delta| * |k|`` (``|q|``) for dq (dk), not the
    (near-zero) gradient itself. fp32 gets 16 eps: there the kernel's and PyTorch's errors are
    both a few ulp from different summation orders, and their ratio is noise.
    """
    few = 16.0 if inp["dtype"] == torch.float32 else 4.0
    if name in ("out", "dv"):
        return few
    delta = (inp["dout"] * ref["out"]).sum(-1).abs().max().item()
    scale = inp["q"].shape[-1] ** -0.5
    if name == "dbias":
        n_full = ref["dq"].numel() // ref["dq"].shape[-1] * inp["k"].shape[-3]  # rows x keys
        mag = delta * (n_full / ref["dbias"].numel()) ** 0.5
    else:
        mag = scale * delta * inp["k" if name == "dq" else "q"].abs().max().item()
    return few * max(1.0, mag) / max(1.0, ref[name].abs().max().item())


@pytest.mark.parametrize("case", _pairwise(AXES), ids=_case_id)
def test_parity_pairwise(case, poison):
    _check_parity(case)


def _full_product():
    for values in itertools.product(*AXES.values()):
        case = dict(zip(AXES, values))
        if _feasible(case):
            yield case


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_full_product()), ids=_case_id)
def test_parity_full_product(case, poison):
    _check_parity(case)


def test_pairwise_grid_covers_every_pair():
    cases = _pairwise(AXES)
    for a, b in itertools.combinations(AXES, 2):
        for va, vb in itertools.product(AXES[a], AXES[b]):
            if _feasible({a: va, b: vb}):
                assert any(c[a] == va and c[b] == vb for c in cases), (a, va, b, vb)
