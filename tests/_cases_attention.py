"""The ONE list of attention parity cases, run by every backend's parity test (``torch`` in
test_attention.py, ``cuda-host`` on the CPU and ``cuda`` on a GPU in test_cuda_attention.py), plus
the extra cases for backends that take any head_dim and fp64 (``ANY_HEAD_DIM_CASES``).

Every case runs forward and backward through ``fastbert.ops.attention`` and compares out, dq, dk,
dv and (bias cases, with a gradient) dbias against the reference in fp64 and in the case's dtype
(``_cases.check_runs``; the floor of the attention rule is ``_tolerance.attention_floor_eps``).
Axes, each value at least once: fp32/fp16/bf16; head_dim 8/32/40/64/80/96/128/256 (every bucket,
padded lanes); seqlen 1/17/33/97 with seqlen_q != seqlen_k; attention_mask; attn_bias
[1,1,Lq,Lk] / [B,1,1,Lk] / [B,H,Lq,Lk]; dropout (the reference's Philox mask); varlen with an
empty sequence; empty rows (a fully masked sequence, -inf bias rows); strided q/k/v views of a
packed QKV tensor, 16-byte aligned (cp.async path) and not (element loads). Also the keywords of
a valid call of the host build's ``attention_fwd`` binding and the check that it rejects an override.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _cases import BF16, F16, F32, F64, check_runs, randn
from _tolerance import attention_floor_eps

from fastbert.ops import attention

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
    mask: bool | str = False  # True: attention_mask with the last sequence fully masked (empty
    #                           rows); "lengths": every sequence 1..seqlen_k keys long
    bias: str | None = None  # a key of ATTENTION_BIAS_SHAPES; "BHQK" carries -inf rows (empty rows)
    bias_fp32: bool = False  # an fp32 bias beside fp16/bf16 q/k/v (read through its own dtype)
    dropout_p: float = 0.0
    special: str = ""  # "finfo_min" (rows of an fp32 bias all finfo.min: they average V) |
    #                    "poison" (NaN / Inf in the K and V rows of masked keys: no influence)

    def __str__(self) -> str:
        shape = (f"varlen{'_'.join(map(str, self.lengths))}" if self.layout == "varlen"
                 else f"{self.layout}{self.batch}x{self.seqlen_q}x{self.seqlen_k}")
        feats = [f for f, on in (("masklen" if self.mask == "lengths" else "mask", self.mask), (f"bias{self.bias}{'f32' * self.bias_fp32}", self.bias),
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

# For backends that take every head_dim and fp64 (the torch backend): fp64, head_dims 24 and 26
# off the kernels' grid, a four-sequence varlen batch; masks of random lengths.
ANY_HEAD_DIM_CASES = tuple(
    AttentionCase(dtype, head_dim, seqlen, seqlen, batch=batch, num_heads=heads, mask="lengths", bias=bias)
    for batch, seqlen, heads, head_dim, bias in ((1, 1, 1, 32, None), (3, 7, 2, 40, "B11K"), (2, 97, 2, 64, "11QK"),
                                                 (3, 7, 3, 26, "BHQK"), (1, 17, 2, 80, None), (2, 7, 2, 96, "B11K"),
                                                 (1, 9, 1, 128, None))
    for dtype in (F32, BF16, F16, F64)
) + tuple(AttentionCase(dtype, 24, layout="varlen", lengths=(5, 0, 11, 3)) for dtype in (F32, BF16, F64))

# Padded calls without mask, bias or dropout (the torch backend's eager path: one aten flash call whose
# statistics carry its heads-first views to the backward): seqlen_q != seqlen_k, strided QKV views
# (aligned and not), batch 1 and one query, fp64 (which recomputes instead).
UNMASKED_CASES = (
    AttentionCase(F32, 64, 17, 33, batch=3, num_heads=3),
    AttentionCase(BF16, 40, 33, 33, layout="packed"),
    AttentionCase(F16, 80, 16, 16, batch=1, layout="unaligned"),
    AttentionCase(F32, 26, 1, 97, batch=1, num_heads=1),
    AttentionCase(F64, 32, 9, 9),
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
            t[n] = randn(g, total, h, d)
        return t
    b, lq, lk = case.batch, case.seqlen_q, case.seqlen_k
    if case.layout in ("packed", "unaligned"):  # q/k/v: strided views [b, l, h, d] of [b, l, 3, h, d]
        assert lq == lk, "packed QKV needs seqlen_q == seqlen_k"
        t["qkv"] = randn(g, b, lq, 3, h, d)
    else:
        t["q"], t["k"], t["v"] = randn(g, b, lq, h, d), randn(g, b, lk, h, d), randn(g, b, lk, h, d)
    t["dout"] = randn(g, b, lq, h, d)
    if case.mask == "lengths":
        lengths = torch.randint(1, lk + 1, (b,), generator=g)
        t["attention_mask"] = torch.arange(lk)[None, :] < lengths[:, None]
    elif case.mask:
        mask = torch.rand(b, lk, generator=g) > 0.3
        mask[:, 0] = True
        mask[-1] = False  # the last sequence attends to nothing: every row of it is empty
        t["attention_mask"] = mask
    if case.bias is not None:
        shape = {"11QK": (1, 1, lq, lk), "B11K": (b, 1, 1, lk), "BHQK": (b, h, lq, lk)}[case.bias]
        bias = randn(g, *shape)
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


def _floor_eps(name: str, case: AttentionCase, inputs: dict, hi: dict) -> float:
    """``_tolerance.attention_floor_eps`` for this case (packed layouts: |q| and |k| of the QKV tensor)."""
    q = inputs["qkv"] if "qkv" in inputs else inputs["q"]
    k = inputs["qkv"] if "qkv" in inputs else inputs["k"]
    return attention_floor_eps(name, hi, dout=inputs["dout"], q=q, k=k, dtype=case.dtype,
                               head_dim=case.head_dim, seqlen_k=case.seqlen_k,
                               bias_dtype=F32 if case.bias_fp32 else case.dtype)


def check_attention_case(case: AttentionCase, backend: str, device, flash_floor: bool = True) -> None:
    """out and every gradient of ``case`` on ``backend`` vs the reference (fp64 and low precision);
    empty rows must give exact zeros (output and dq) and nothing may be NaN. ``flash_floor``: the
    floor of FlashAttention-style backwards (``_tolerance.attention_floor_eps``), else 4 eps."""
    inputs = attention_inputs(case)
    got = check_runs(case, lambda inp, b, dev, dt: _attn_run(case, _poisoned(case, inp) if b == backend else inp,
                                                             b, dev, dt),
                     inputs, backend, device,
                     floor_eps=(lambda name, hi: _floor_eps(name, case, inputs, hi)) if flash_floor else None)
    if case.mask is True:  # the fully masked last sequence: exact zeros, not just small numbers
        assert torch.equal(got["out"][-1].cpu(), torch.zeros_like(got["out"][-1].cpu())), f"{case}: empty rows"
        assert torch.equal(got["dq"][-1].cpu(), torch.zeros_like(got["dq"][-1].cpu())), f"{case}: empty-row dq"


def attention_binding_kwargs() -> tuple:
    """``(kw, keep)``: the keywords of a valid ``attention_fwd`` call of the host build's binding on
    tiny CPU tensors (the binding tests override one entry); hold ``keep`` (the tensors) until the call."""
    q = torch.randn(1, 4, 1, 8)
    out, lse = torch.empty_like(q), torch.empty(2, 1, 1, 4)
    kw = dict(q=q.data_ptr(), q_strides=(32, 8, 8), k=q.data_ptr(), k_strides=(32, 8, 8), v=q.data_ptr(),
              v_strides=(32, 8, 8), out=out.data_ptr(), out_strides=(32, 8, 8), lse=lse.data_ptr(),
              lse_strides=(4, 4, 4), cu_seqlens=0, attention_mask=0, mask_strides=(0, 0), attn_bias=0, bias_dtype=0,
              bias_strides=(0, 0, 0, 0), seed=0, batch=1, num_heads=1, head_dim=8, seqlen_q=4, seqlen_k=4, dtype=0,
              dropout_p=0.0, softmax_scale=0.5, stream=0, device=-1)
    return kw, (q, out, lse)


def assert_host_binding_rejects(override: dict, pattern: str) -> None:
    """The host build's ``attention_fwd`` binding raises ValueError matching ``pattern`` on the valid
    call of ``attention_binding_kwargs`` with ``override``; skips where it is not built."""
    from fastbert.backends.cuda import load_extension

    ext = load_extension("_C_host")
    if isinstance(ext, str) or not hasattr(ext, "attention_fwd"):
        pytest.skip("fastbert._C_host with attention is not built")
    kw, keep = attention_binding_kwargs()
    kw.update(override)
    with pytest.raises(ValueError, match=pattern):
        ext.attention_fwd(**kw)
    del keep
