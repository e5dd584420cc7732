"""CUDA rotary-embedding kernel (csrc/rotary.cu) vs the fp64 reference: on the CPU through
``cuda-host`` and on a GPU through ``cuda``.

Every case runs ``fastbert.ops.rotary`` forward and backward (outputs poisoned) and compares q_out,
k_out, dq and dk with the reference in fp64 and in the case's dtype (``_cases.check_runs``). The
default grid covers every axis value at least once: fp32/fp16/bf16; rotate_half and interleaved;
padded (default positions, per-batch and broadcast position_ids) and varlen (cu_seqlens with empty
sequences and sequences of length 1, explicit position_ids); full and partial rotary; head_dim with
the 16-byte path (64, 96, 80) and without (27 with rotary 26, 16 with rotary 10, 2); q and k with
different head counts; strided views of a packed QKV tensor; seqlen 1. Also: the kernel with its
outputs aliasing its inputs (in place), the planted off-by-one fault failing the check, the
binding's own argument checks, and (GPU) CUDA-graph capture. The full product is behind ``slow``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from _cases import BF16, CUDA_BACKENDS, F16, F32, check_runs, randn, require_backend
from _cuda_graph import assert_replay_matches_eager

from fastbert.ops import rotary

MAX_POSITIONS = 64


@dataclass(frozen=True)
class RotaryCase:
    lead: tuple  # (batch, seqlen) padded or (total_tokens,) varlen
    heads: int
    heads_k: int
    head_dim: int
    rotary_dim: int
    dtype: torch.dtype
    interleaved: bool = False
    positions: str = "default"  # padded: "default" | "ids" | "ids_bcast"; varlen: "cu" | "ids"
    cu: tuple = ()  # varlen with positions="cu": sequence lengths (sum = total_tokens)
    packed: bool = False  # q, k are strided views of one [..., 3, heads, head_dim] tensor

    def __str__(self) -> str:
        lay = "x".join(map(str, self.lead))
        return (f"{lay}-h{self.heads}/{self.heads_k}-d{self.head_dim}r{self.rotary_dim}-{str(self.dtype)[6:]}-"
                f"{'inter' if self.interleaved else 'half'}-{self.positions}{'-packed' if self.packed else ''}")


ROTARY_CASES = (
    RotaryCase((2, 37), 3, 2, 64, 64, BF16),
    RotaryCase((3, 9), 2, 1, 27, 26, F16, positions="ids"),
    RotaryCase((1, 1), 4, 4, 80, 40, F32, True, positions="ids"),
    RotaryCase((20,), 2, 1, 96, 96, BF16, True, positions="cu", cu=(5, 0, 1, 14)),
    RotaryCase((8,), 3, 2, 40, 24, F32, positions="cu", cu=(1, 0, 7, 0)),
    RotaryCase((11,), 1, 3, 16, 10, F16, True, positions="ids"),
    RotaryCase((2, 17), 2, 2, 64, 32, F16, positions="ids_bcast"),
    RotaryCase((2, 13), 2, 2, 32, 32, F32, True, packed=True),
    RotaryCase((3, 5), 1, 1, 2, 2, BF16, True),
    RotaryCase((2, 6), 4, 4, 64, 48, BF16, packed=True, positions="ids"),
)

SLOW_CASES = tuple(
    RotaryCase(lead, 3, 2, d, r, dtype, inter, pos, cu)
    for dtype, inter, (d, r), (lead, pos, cu) in itertools.product(
        (F32, F16, BF16), (False, True), ((64, 64), (128, 64), (96, 32), (33, 32), (26, 26), (8, 2)),
        (((4, 61), "default", ()), ((3, 29), "ids", ()), ((50,), "cu", (1, 0, 30, 19, 0)), ((9,), "ids", ()))))


def rotary_inputs(case: RotaryCase, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 7919 * case.head_dim + 31 * sum(case.lead) + case.rotary_dim)
    t = {}
    if case.packed:  # ModernBERT's Wqkv output viewed as q, k: strided, contiguous last dim
        t["qkv"] = randn(g, *case.lead, 3, case.heads, case.head_dim)
    else:
        t["q"] = randn(g, *case.lead, case.heads, case.head_dim)
        t["k"] = randn(g, *case.lead, case.heads_k, case.head_dim)
    angles = torch.rand(MAX_POSITIONS, case.rotary_dim // 2, generator=g, dtype=torch.float64) * 40.0
    t["cos"], t["sin"] = angles.cos(), angles.sin()  # arbitrary angles: every table entry matters
    heads_k = case.heads if case.packed else case.heads_k
    t["dq"] = randn(g, *case.lead, case.heads, case.head_dim)
    t["dk"] = randn(g, *case.lead, heads_k, case.head_dim)
    if case.positions == "ids":
        t["position_ids"] = torch.randint(0, MAX_POSITIONS, case.lead, generator=g)
    elif case.positions == "ids_bcast":
        t["position_ids"] = torch.randint(0, MAX_POSITIONS, (1, case.lead[1]), generator=g)
    return t


def _kwargs(case: RotaryCase, inputs: dict, device) -> dict:
    kw = {"interleaved": case.interleaved}
    if case.positions == "cu":
        cu = torch.tensor((0,) + tuple(itertools.accumulate(case.cu)), dtype=torch.int32)
        assert cu[-1] == case.lead[0], case
        kw["cu_seqlens"] = cu.to(device)
    elif "position_ids" in inputs:
        kw["position_ids"] = inputs["position_ids"].to(device)
    return kw


def _run(case: RotaryCase, inputs: dict, backend: str, device, dtype) -> dict:
    if case.packed:
        qkv = inputs["qkv"].to(device=device, dtype=dtype).requires_grad_()
        leaves = [qkv]
        q, k = qkv[..., 0, :, :], qkv[..., 1, :, :]
    else:
        q = inputs["q"].to(device=device, dtype=dtype).requires_grad_()
        k = inputs["k"].to(device=device, dtype=dtype).requires_grad_()
        leaves = [q, k]
    cos, sin = (inputs[n].to(device) for n in ("cos", "sin"))
    q_out, k_out = rotary(q, k, cos, sin, backend=backend, **_kwargs(case, inputs, device))
    douts = (inputs["dq"].to(device, dtype), inputs["dk"].to(device, dtype))
    grads = torch.autograd.grad((q_out, k_out), leaves, douts)
    if case.packed:  # the gradient of the packed tensor, split back into its q and k parts (v gets 0)
        (dqkv,) = grads
        assert torch.equal(dqkv[..., 2, :, :], torch.zeros_like(dqkv[..., 2, :, :]))
        grads = (dqkv[..., 0, :, :], dqkv[..., 1, :, :])
    return dict(zip(("q_out", "k_out", "dq", "dk"), (q_out, k_out, *grads)))


def check_rotary_case(case: RotaryCase, backend: str, device) -> None:
    """Outputs and both gradients of ``case`` on ``backend`` vs the reference (fp64 and low precision)."""
    check_runs(case, lambda inputs, b, dev, dt: _run(case, inputs, b, dev, dt), rotary_inputs(case), backend, device)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=str)
def test_cuda_rotary_matches_reference(case, backend, device, poison):
    require_backend(backend, "rotary")
    check_rotary_case(case, backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_cuda_rotary_matches_reference_full_grid(case, backend, device, poison):
    require_backend(backend, "rotary")
    check_rotary_case(case, backend, device)


def _compute_module(backend: str):
    from fastbert.backends import get_backend

    require_backend(backend, "rotary")
    return get_backend(backend).load("rotary")


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("head_dim,rotary_dim,dtype", [(64, 64, BF16), (27, 20, F32), (96, 64, F16)])
def test_cuda_rotary_in_place(backend, device, interleaved, head_dim, rotary_dim, dtype):
    """The kernel with out == in (forward and backward), on a strided packed-QKV view and on
    varlen tensors, gives the bits of the out-of-place call; passthrough features stay as they were
    and the packed tensor's v part is not written."""
    mod = _compute_module(backend)
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    angles = torch.rand(16, rotary_dim // 2, generator=g) * 20
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    qkv = torch.randn(2, 9, 3, 4, head_dim, generator=g).to(device, dtype)  # padded, strided q / k views
    v = qkv[:, :, 2].clone()
    pos = torch.randint(0, 16, (2, 9), generator=g).to(device)
    qv = torch.randn(13, 3, head_dim, generator=g).to(device, dtype)  # varlen
    kv = torch.randn(13, 1, head_dim, generator=g).to(device, dtype)
    pos_v = torch.randint(0, 16, (13,), generator=g).to(device)
    for direction in ("fwd", "bwd"):
        fn = getattr(mod, f"rotary_{direction}")
        for q, k, p in ((qkv[:, :, 0], qkv[:, :, 1], pos), (qv, kv, pos_v)):
            want_q, want_k = torch.empty_like(q), torch.empty_like(k)
            fn(q, k, cos, sin, want_q, want_k, positions=p, interleaved=interleaved)
            before = q.clone()
            fn(q, k, cos, sin, q, k, positions=p, interleaved=interleaved)  # in place
            assert torch.equal(q, want_q) and torch.equal(k, want_k), direction
            assert torch.equal(q[..., rotary_dim:], before[..., rotary_dim:])
            assert not torch.equal(q[..., :rotary_dim], before[..., :rotary_dim])
    assert torch.equal(qkv[:, :, 2], v)  # nothing written outside the q / k views


def test_cuda_rotary_planted_fault_fails_the_check(monkeypatch, poison):
    """FASTBERT_CUDA_FAULT=1 drops the last rotated pair: the parity check must fail (a harness
    that cannot fail proves nothing)."""
    require_backend("cuda-host", "rotary")
    monkeypatch.setenv("FASTBERT_CUDA_FAULT", "1")
    for case in (ROTARY_CASES[0], ROTARY_CASES[3]):  # rotate_half and interleaved
        with pytest.raises(AssertionError):
            check_rotary_case(case, "cuda-host", "cpu")


def test_cuda_rotary_binding_checks_its_arguments():
    require_backend("cuda-host", "rotary")
    from fastbert.backends.cuda._ext import load_extension

    ext = load_extension("_C_host")
    q = torch.randn(1, 3, 2, 8)
    cos = torch.randn(3, 4)
    pos = torch.arange(3).expand(1, 3)
    st = (48, 16, 8)
    sizes = dict(cos=cos.data_ptr(), sin=cos.data_ptr(), positions=pos.data_ptr(), batch=1, seqlen=3, q_heads=2,
                 k_heads=2, head_dim=8, rotary_dim=8, positions_strides=(0, 1), dtype=0, device=-1)
    kw = dict(q=q.data_ptr(), k=q.data_ptr(), q_out=q.data_ptr(), k_out=q.data_ptr(), q_strides=st, k_strides=st,
              q_out_strides=st, k_out_strides=st, **sizes)
    ext.rotary_fwd(**kw)  # valid (in place)
    with pytest.raises(ValueError, match=r"rotary_dim: expected an even number in \[2, head_dim = 8\], got 7"):
        ext.rotary_fwd(**{**kw, "rotary_dim": 7})
    with pytest.raises(ValueError, match=r"rotary_dim: .* got 10"):
        ext.rotary_fwd(**{**kw, "rotary_dim": 10})
    with pytest.raises(ValueError, match="q_heads, k_heads: expected at least one head"):
        ext.rotary_fwd(**{**kw, "q_heads": 0, "k_heads": 0})
    with pytest.raises(ValueError, match=r"k_strides: expected >= 0 \(seq\), got -1"):
        ext.rotary_fwd(**{**kw, "k_strides": (48, -1, 8)})
    with pytest.raises(ValueError, match="cos: expected a pointer aligned to 4 bytes"):
        ext.rotary_fwd(**{**kw, "cos": cos.data_ptr() + 2})
    with pytest.raises(ValueError, match="dq_out: expected a non-null pointer"):  # the backward's own names
        ext.rotary_bwd(dq_out=0, dk_out=q.data_ptr(), dq=q.data_ptr(), dk=q.data_ptr(), dq_out_strides=st,
                       dk_out_strides=st, dq_strides=st, dk_strides=st, **sizes)


@pytest.mark.gpu
def test_cuda_rotary_captures_and_replays_in_a_cuda_graph():
    """Forward and backward capture in a CUDA graph (positions from cu_seqlens computed on the
    device, no host sync); a replay on new q / k values equals an eager run bit for bit."""
    require_backend("cuda", "rotary")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(300, 12, 64, generator=g).to("cuda", BF16).requires_grad_()
    k = torch.randn(300, 12, 64, generator=g).to("cuda", BF16).requires_grad_()
    angles = torch.rand(512, 32, generator=g)
    cos, sin = angles.cos().cuda(), angles.sin().cuda()
    cu = torch.tensor([0, 100, 100, 299, 300], dtype=torch.int32, device="cuda")
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def step():
        oq, ok = rotary(q, k, cos, sin, cu_seqlens=cu, backend="cuda")
        return (oq, ok) + torch.autograd.grad((oq, ok), (q, k), (dq, dk))

    assert_replay_matches_eager(step, refresh=(q, k), names=("q_out", "k_out", "dq", "dk"), what="rotary cuda")
