"""The ONE list of CUDA parity cases for LayerNorm, GELU and attention (its section at the end), run
by the ``cuda-host`` tests on the CPU (CI) and by the ``gpu``-marked ``cuda`` tests on a GPU (device
check), plus the checks both run.

Every case runs forward and backward through ``fastbert.ops`` with the backend under test, with
outputs poisoned (NaN) by the caller's ``poison`` fixture, and compares the output and every input
gradient against the reference in fp64 and in the case's dtype (STYLE.md's tolerance rule). Cases
cover every axis value at least once: fp32/fp16/bf16; hidden 1 / 24 / 40 / 384 / 1023 / 1536 (16-byte
vector path and scalar tails); weight/bias absent, in x's dtype or fp32; residual, x_bias, dropout;
rows past one column split (> 32 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from _tolerance import EPS, assert_close_to_ref

from fastbert.ops import attention, gelu, layer_norm

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class LayerNormCase:
    rows: int
    hidden: int
    dtype: torch.dtype
    params: str = "fp32"  # "fp32" | "x" (x's dtype) | "weight" (weight only, fp32) | "none"
    residual: bool = False
    x_bias: bool = False
    dropout_p: float = 0.0

    def __str__(self) -> str:
        fused = "+".join(n for n, on in (("res", self.residual), ("xb", self.x_bias),
                                         (f"p{self.dropout_p}", self.dropout_p > 0)) if on) or "plain"
        return f"{self.rows}x{self.hidden}-{str(self.dtype)[6:]}-{self.params}-{fused}"


@dataclass(frozen=True)
class GeluCase:
    rows: int
    hidden: int
    dtype: torch.dtype
    bias: str = "x"  # "x" (x's dtype) | "fp32" | "none"
    approximate: str = "none"

    def __str__(self) -> str:
        return f"{self.rows}x{self.hidden}-{str(self.dtype)[6:]}-bias_{self.bias}-{self.approximate}"


LAYER_NORM_CASES = (
    LayerNormCase(5, 1023, F32, "fp32", residual=True, x_bias=True, dropout_p=0.1),
    LayerNormCase(4, 384, F16, "fp32"),
    LayerNormCase(3, 1536, BF16, "x", residual=True),
    LayerNormCase(6, 384, F16, "x", x_bias=True, dropout_p=0.2),
    LayerNormCase(2, 1023, BF16, "none", dropout_p=0.5),
    LayerNormCase(7, 1536, F32, "weight", residual=True, x_bias=True),
    LayerNormCase(3, 1, F32, "fp32", residual=True),
    LayerNormCase(40, 40, F16, "fp32", residual=True, x_bias=True, dropout_p=0.3),
    LayerNormCase(35, 1023, F16, "x", residual=True),
)

GELU_CASES = (
    GeluCase(5, 1023, F32, "fp32"),
    GeluCase(4, 384, F16, "x", "tanh"),
    GeluCase(3, 1536, BF16, "none"),
    GeluCase(6, 384, BF16, "fp32", "tanh"),
    GeluCase(40, 24, F16, "x"),
    GeluCase(2, 1023, F16, "fp32", "tanh"),
    GeluCase(3, 1536, F32, "none", "tanh"),
)


def _randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def layer_norm_inputs(case: LayerNormCase, seed: int = 0) -> dict:
    """fp64 master copies of the case's inputs (cast per run), keyed by argument name."""
    g = torch.Generator().manual_seed(seed + case.rows * 7919 + case.hidden)
    t = {"x": _randn(g, case.rows, case.hidden, scale=2.0) + 0.5}
    if case.params in ("fp32", "x", "weight"):
        t["weight"] = 1.0 + _randn(g, case.hidden, scale=0.3)
    if case.params in ("fp32", "x"):
        t["bias"] = _randn(g, case.hidden, scale=0.3)
    if case.residual:
        t["residual"] = _randn(g, case.rows, case.hidden)
    if case.x_bias:
        t["x_bias"] = _randn(g, case.hidden, scale=0.3)
    t["dy"] = _randn(g, case.rows, case.hidden)
    return t


def _ln_run(case: LayerNormCase, inputs: dict, backend: str, device, dtype) -> list:
    names = [n for n in ("x", "weight", "bias", "residual", "x_bias") if n in inputs]
    param_dtype = dtype if dtype == torch.float64 or case.params == "x" else torch.float32

    def cast(n):
        dt = param_dtype if n in ("weight", "bias") else dtype
        if n == "x_bias" and case.params != "x" and dtype != torch.float64:
            dt = torch.float32  # fp32 x_bias beside low-precision x in the fp32-parameter cases
        return inputs[n].to(device=device, dtype=dt).requires_grad_()

    leaves = {n: cast(n) for n in names}
    torch.manual_seed(1234)  # the dropout seed: the same draw for every run on this device
    y = layer_norm(leaves["x"], leaves.get("weight"), leaves.get("bias"), eps=1e-5,
                   residual=leaves.get("residual"), x_bias=leaves.get("x_bias"),
                   dropout_p=case.dropout_p, backend=backend)
    dy = inputs["dy"].to(device=device, dtype=y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return [("y", y)] + [("d" + n, g) for n, g in zip(leaves, grads)]


def check_layer_norm_case(case: LayerNormCase, backend: str, device) -> None:
    """Output and every gradient of ``case`` on ``backend`` vs the reference (fp64 and low precision)."""
    inputs = layer_norm_inputs(case)
    got = _ln_run(case, inputs, backend, device, case.dtype)
    hi = _ln_run(case, inputs, "reference", device, torch.float64)
    lo = _ln_run(case, inputs, "reference", device, case.dtype)
    for (name, g), (_, h), (_, l) in zip(got, hi, lo):
        assert_close_to_ref(g.cpu(), h.cpu(), l.cpu(), name=f"{case} {name}")


def gelu_inputs(case: GeluCase, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + case.rows * 104729 + case.hidden)
    t = {"x": _randn(g, case.rows, case.hidden, scale=3.0)}  # covers both tails
    if case.bias != "none":
        t["bias"] = _randn(g, case.hidden, scale=0.5)
    t["dy"] = _randn(g, case.rows, case.hidden)
    return t


def _gelu_run(case: GeluCase, inputs: dict, backend: str, device, dtype) -> list:
    x = inputs["x"].to(device=device, dtype=dtype).requires_grad_()
    leaves = [x]
    bias = None
    if "bias" in inputs:
        bias = inputs["bias"].to(device=device, dtype=torch.float32 if case.bias == "fp32" and dtype != torch.float64
                                 else dtype).requires_grad_()
        leaves.append(bias)
    y = gelu(x, bias=bias, approximate=case.approximate, backend=backend)
    grads = torch.autograd.grad(y, leaves, inputs["dy"].to(device=device, dtype=y.dtype))
    return [("y", y), ("dx", grads[0])] + ([("dbias", grads[1])] if bias is not None else [])


def check_gelu_case(case: GeluCase, backend: str, device) -> None:
    """Output and every gradient of ``case`` on ``backend`` vs the reference (fp64 and low precision)."""
    inputs = gelu_inputs(case)
    got = _gelu_run(case, inputs, backend, device, case.dtype)
    hi = _gelu_run(case, inputs, "reference", device, torch.float64)
    lo = _gelu_run(case, inputs, "reference", device, case.dtype)
    for (name, g), (_, h), (_, l) in zip(got, hi, lo):
        assert_close_to_ref(g.cpu(), h.cpu(), l.cpu(), name=f"{case} {name}")


# ==============================================================================================
# Attention (csrc/attention_fwd.cu, csrc/attention_bwd.cu) — the attention kernels' section
# ==============================================================================================
# Every case runs forward and backward through ``fastbert.ops.attention`` and compares out, dq, dk,
# dv and (bias cases, with a gradient) dbias against the reference in fp64 and in the case's dtype.
# Axes, each value at least once: fp32/fp16/bf16; head_dim 8/32/40/64/80/96/128/256 (every bucket,
# padded lanes); seqlen 1/17/33/97 with seqlen_q != seqlen_k; attention_mask; attn_bias
# [1,1,Lq,Lk] / [B,1,1,Lk] / [B,H,Lq,Lk]; dropout (the reference's Philox mask); varlen with an
# empty sequence; empty rows (a fully masked sequence, -inf bias rows); strided q/k/v views of a
# packed QKV tensor, 16-byte aligned (cp.async path) and not (element loads).

ATTENTION_BIAS_SHAPES = {"11QK": "[1,1,Lq,Lk]", "B11K": "[B,1,1,Lk]", "BHQK": "[B,H,Lq,Lk]"}


@dataclass(frozen=True)
class AttentionCase:
    dtype: torch.dtype
    head_dim: int
    seqlen_q: int = 17  # varlen: ignored (lengths below)
    seqlen_k: int = 17
    batch: int = 2
    num_heads: int = 2
    layout: str = "padded"  # "padded" | "packed" (strided views of one QKV tensor) | "unaligned"
    #                         (packed, one element past a 16-byte boundary: scalar loads) | "varlen"
    lengths: tuple = ()  # varlen sequence lengths (0 allowed)
    mask: bool = False  # attention_mask, with the last sequence fully masked (empty rows)
    bias: str | None = None  # a key of ATTENTION_BIAS_SHAPES; "BHQK" carries -inf rows (empty rows)
    bias_fp32: bool = False  # an fp32 bias beside fp16/bf16 q/k/v (read through its own dtype)
    dropout_p: float = 0.0
    special: str = ""  # "finfo_min" (rows of an fp32 bias all finfo.min: they average V) |
    #                    "poison" (NaN / Inf in the K and V rows of masked keys: no influence)

    def __str__(self) -> str:
        shape = (f"varlen{'_'.join(map(str, self.lengths))}" if self.layout == "varlen"
                 else f"{self.layout}{self.batch}x{self.seqlen_q}x{self.seqlen_k}")
        feats = [f for f, on in (("mask", self.mask), (f"bias{self.bias}{'f32' * self.bias_fp32}", self.bias),
                                 (f"p{self.dropout_p}", self.dropout_p > 0), (self.special, self.special)) if on]
        return f"{str(self.dtype)[6:]}-d{self.head_dim}-h{self.num_heads}-{shape}-{'+'.join(feats) or 'plain'}"


ATTENTION_CASES = (
    AttentionCase(F16, 64, 17, 17, mask=True),
    AttentionCase(BF16, 40, 17, 97, bias="11QK", dropout_p=0.1),
    AttentionCase(F32, 80, 97, 17, num_heads=1, mask=True, bias="B11K"),
    AttentionCase(F16, 96, 1, 97, bias="BHQK", dropout_p=0.2),
    AttentionCase(F16, 32, layout="varlen", lengths=(17, 0, 33), dropout_p=0.1),
    AttentionCase(BF16, 128, layout="varlen", lengths=(1, 0, 40)),
    AttentionCase(F32, 64, layout="varlen", lengths=(0, 97), num_heads=1, dropout_p=0.2),
    AttentionCase(F16, 128, 33, 33, layout="packed", mask=True),
    AttentionCase(BF16, 256, 17, 17, batch=1, bias="BHQK"),
    AttentionCase(F32, 8, 17, 33, mask=True, dropout_p=0.3),
    AttentionCase(F32, 256, 17, 17, batch=1, num_heads=1, bias="11QK"),
    AttentionCase(BF16, 64, 33, 33, layout="packed", dropout_p=0.1, bias="B11K"),
    AttentionCase(F16, 80, 17, 17, layout="unaligned", mask=True, dropout_p=0.1, bias="B11K", bias_fp32=True),
    AttentionCase(F32, 40, 33, 33, batch=1, layout="unaligned", bias="BHQK"),
    AttentionCase(F16, 64, 17, 33, bias="BHQK", bias_fp32=True, special="finfo_min"),
    AttentionCase(BF16, 32, 17, 40, bias="BHQK", bias_fp32=True, special="finfo_min", dropout_p=0.1),
    AttentionCase(F16, 40, 33, 33, mask=True, bias="B11K", special="poison"),
)


def attention_inputs(case: AttentionCase, seed: int = 0) -> dict:
    """fp64 master copies of the case's inputs (cast per run)."""
    g = torch.Generator().manual_seed(seed + case.head_dim * 7919 + case.seqlen_q * 31 + case.seqlen_k)
    h, d = case.num_heads, case.head_dim
    t: dict = {}
    if case.layout == "varlen":
        total = sum(case.lengths)
        cu = [0]
        for n in case.lengths:
            cu.append(cu[-1] + n)
        t["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        t["max_seqlen"] = max(case.lengths)
        for n in ("q", "k", "v", "dout"):
            t[n] = _randn(g, total, h, d)
        return t
    b, lq, lk = case.batch, case.seqlen_q, case.seqlen_k
    if case.layout in ("packed", "unaligned"):  # q/k/v: strided views [b, l, h, d] of [b, l, 3, h, d]
        assert lq == lk, "packed QKV needs seqlen_q == seqlen_k"
        t["qkv"] = _randn(g, b, lq, 3, h, d)
    else:
        t["q"], t["k"], t["v"] = _randn(g, b, lq, h, d), _randn(g, b, lk, h, d), _randn(g, b, lk, h, d)
    t["dout"] = _randn(g, b, lq, h, d)
    if case.mask:
        mask = torch.rand(b, lk, generator=g) > 0.3
        mask[:, 0] = True
        mask[-1] = False  # the last sequence attends to nothing: every row of it is empty
        t["attention_mask"] = mask
    if case.bias is not None:
        shape = {"11QK": (1, 1, lq, lk), "B11K": (b, 1, 1, lk), "BHQK": (b, h, lq, lk)}[case.bias]
        bias = _randn(g, *shape)
        if case.bias == "BHQK":
            bias[0, 0, lq // 2] = float("-inf")  # an empty row
            bias[-1, -1, :, lk // 2] = float("-inf")  # an excluded key
        if case.special == "finfo_min":  # rows a finite number away from everything: they average V
            bias[0, -1, 1] = torch.finfo(torch.float32).min
            bias[-1, :, lq - 2:] = torch.finfo(torch.float32).min
        t["attn_bias"] = bias
    return t


def _poisoned(case: AttentionCase, inputs: dict) -> dict:
    """The inputs with NaN / Inf in every K and V row of a masked key (the subject run only)."""
    if case.special != "poison":
        return inputs
    bad = ~inputs["attention_mask"][:, :, None, None]
    out = dict(inputs)
    out["k"] = torch.where(bad, float("nan"), inputs["k"])
    out["v"] = torch.where(bad, float("inf"), inputs["v"])
    return out


def _attn_run(case: AttentionCase, inputs: dict, backend: str, device, dtype) -> dict:
    """out and every gradient on ``backend``, computing in ``dtype``."""
    def leaf(name):
        return inputs[name].to(device=device, dtype=dtype).requires_grad_()

    kw = {}
    if case.layout == "packed":
        qkv = leaf("qkv")
        q, k, v = qkv.unbind(2)
        leaves = [qkv]
    elif case.layout == "unaligned":  # the views start one element into a flat buffer
        flat = inputs["qkv"].reshape(-1)
        buf = torch.cat([flat[:1], flat]).to(device=device, dtype=dtype).requires_grad_()
        q, k, v = buf[1:].view(inputs["qkv"].shape).unbind(2)
        leaves = [buf]
    else:
        q, k, v = leaf("q"), leaf("k"), leaf("v")
        leaves = [q, k, v]
    if case.layout == "varlen":
        kw["cu_seqlens"] = inputs["cu_seqlens"].to(device)
        kw["max_seqlen"] = inputs["max_seqlen"]
    if "attention_mask" in inputs:
        kw["attention_mask"] = inputs["attention_mask"].to(device)
    if "attn_bias" in inputs:
        bias_dtype = torch.float32 if case.bias_fp32 and dtype != torch.float64 else dtype
        kw["attn_bias"] = inputs["attn_bias"].to(device=device, dtype=bias_dtype).requires_grad_()
        leaves.append(kw["attn_bias"])
    torch.manual_seed(1234)  # the dropout seed: the same draw for every run on this device
    out = attention(q, k, v, dropout_p=case.dropout_p, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, inputs["dout"].to(device=device, dtype=dtype))
    if case.layout == "packed":
        dq, dk, dv = grads[0].unbind(2)
    elif case.layout == "unaligned":
        dq, dk, dv = grads[0][1:].view(inputs["qkv"].shape).unbind(2)
    else:
        dq, dk, dv = grads[:3]
    res = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    if "attn_bias" in inputs:
        res["dbias"] = grads[-1]
    return res


def attention_floor_eps(name: str, case: AttentionCase, inputs: dict, ref: dict) -> float:
    """Tolerance floor (in eps of the dtype, relative to max(1, |ref|)) for output ``name``.

    As in tests/test_triton_attention.py: FA2's ``D = rowsum(dO * O)`` from the stored, rounded O
    cancels against ``dP = dO V^T`` in ``dS = P * (dP - D)``. Where the true dS is ~0 (one key:
    P = 1) the kernel keeps a few ulp of ``|D|`` while the reference, taking D from dP itself,
    cancels exactly, so PyTorch's own error is 0 and only the floor applies. The magnitude that
    cancels is ``|D|`` for dS (times ``sqrt(n)`` for a broadcast bias, a sum of n entries) and
    ``softmax_scale * |D| * |k|`` (``|q|``) for dq (dk). fp32 gets 16 eps (both errors are a few
    ulp from different summation orders and the recomputed P, their ratio is noise).
    """
    few = 16.0 if case.dtype == torch.float32 else 4.0
    if name in ("out", "dv"):
        return few
    delta = (inputs["dout"] * ref["out"].cpu()).sum(-1).abs().max().item()
    if name == "dbias":
        n_full = ref["dq"].numel() // ref["dq"].shape[-1] * case.seqlen_k
        mag = delta * (n_full / ref["dbias"].numel()) ** 0.5
        if case.bias_fp32 and case.dtype != torch.float32:  # an fp32 gradient of a half-precision computation
            mag *= EPS[case.dtype] / EPS[torch.float32]
    else:
        other = inputs["qkv"] if "qkv" in inputs else inputs["k" if name == "dq" else "q"]
        mag = case.head_dim ** -0.5 * delta * other.abs().max().item()
    return few * max(1.0, mag) / max(1.0, ref[name].abs().max().item())


def check_attention_case(case: AttentionCase, backend: str, device) -> None:
    """out and every gradient of ``case`` on ``backend`` vs the reference (fp64 and low precision);
    empty rows must give exact zeros (output and dq) and nothing may be NaN."""
    inputs = attention_inputs(case)
    got = _attn_run(case, _poisoned(case, inputs), backend, device, case.dtype)
    hi = _attn_run(case, inputs, "reference", device, torch.float64)
    lo = _attn_run(case, inputs, "reference", device, case.dtype)
    assert set(got) == set(hi)
    for name in hi:
        assert_close_to_ref(got[name].cpu(), hi[name].cpu(), lo[name].cpu(), name=f"{case} {name}",
                            floor_eps=attention_floor_eps(name, case, inputs, hi))
    if case.mask:  # the fully masked last sequence: exact zeros, not just small numbers
        assert torch.equal(got["out"][-1].cpu(), torch.zeros_like(got["out"][-1].cpu())), f"{case}: empty rows"
        assert torch.equal(got["dq"][-1].cpu(), torch.zeros_like(got["dq"][-1].cpu())), f"{case}: empty-row dq"


def require_backend(backend: str, op: str) -> None:
    """Skip with the backend's own reason when ``backend`` cannot run ``op`` here."""
    import pytest

    from fastbert.backends import get_backend

    spec = get_backend(backend)
    reason = spec.unavailable_reason(op)
    if reason is None and op not in spec.caps:
        reason = f"the extension has no {op} kernels"
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
