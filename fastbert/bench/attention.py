"""Attention benchmarks: fastbert's varlen attention vs what a user would pick instead.

Inputs are BERT-shaped self-attention batches with realistic variable lengths (``--fill``):
fastbert and the varlen competitors (flash-attn, xformers) take the packed layout with
``cu_seqlens``; the padded competitors (eager composite, SDPA, ``torch.compile``) take the
padded batch with a key-padding mask, as Hugging Face does. FLOPs count valid pairs only
(``fastbert.bench.formulas``), so a padded implementation pays for its padding.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F

from fastbert.backends import CallInfo
from fastbert.backends.reference import attention_math, attention_varlen_math
from fastbert.bench.core import (MODEL_SHAPES, Case, Impl, Options, Prepared, cu_seqlens_of,
                                 fastbert_backends, optional_import, padding_mask, prepare_timed,
                                 sdpa_backend_name, variable_lengths)
from fastbert.bench.formulas import attention_flops


_X_NAME = "batch x seqlen (padded tokens per batch fixed)"


def sizes(opts: Options) -> list[tuple[int, int]]:
    """``(seqlen, batch)`` pairs: a fixed padded token count per size, so rates compare."""
    gpu = opts.device != "cpu"
    if opts.seqlens:
        seqlens = opts.seqlens
    elif gpu:
        seqlens = (128, 512) if opts.quick else (128, 256, 512, 1024, 2048)
    else:
        seqlens = (64, 128) if opts.quick else (128, 256, 512)
    tokens = 16384 if gpu else (256 if opts.quick else 2048)
    return [(s, opts.batch or max(1, tokens // s)) for s in seqlens]


class _Inputs:
    """One batch in both layouts, created on first use and shared by the cases of one size."""

    def __init__(self, lengths, seqlen, num_heads, head_dim, dtype, device, seed):
        self.lengths, self.seqlen, self.num_heads, self.head_dim = lengths, seqlen, num_heads, head_dim
        self.dtype, self.device, self.seed = dtype, device, seed
        self.softmax_scale = 1.0 / math.sqrt(head_dim)
        self._floor_mags: dict = {}  # reference dtype -> backward floor magnitudes

    @cached_property
    def varlen(self):
        """q, k, v, dout ``(total_tokens, num_heads, head_dim)``, fresh normal values."""
        g = torch.Generator().manual_seed(self.seed)
        total = sum(self.lengths)
        return [torch.randn(total, self.num_heads, self.head_dim, generator=g).to(self.device, self.dtype)
                for _ in range(4)]

    @cached_property
    def cu_seqlens(self):
        return cu_seqlens_of(self.lengths, self.device)

    @cached_property
    def mask(self):
        return padding_mask(self.lengths, self.seqlen, "cpu").to(self.device)

    @cached_property
    def padded(self):
        """q, k, v, dout ``(batch, seqlen, num_heads, head_dim)``, zeros at padding."""
        out = []
        for t in self.varlen:
            p = t.new_zeros(len(self.lengths), self.seqlen, self.num_heads, self.head_dim)
            p[self.mask] = t
            out.append(p)
        return out

    def floor_mags(self, direction: str, hi):
        """Per result tensor, the magnitude of the terms that cancel in it (the check's floor).

        Backward, FlashAttention's ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)`` from
        the rounded O: where the true dS is ~0 (a one-token sequence: P = 1, dq = dk = 0 exactly,
        and the reference's softmax backward cancels exactly) a correct kernel keeps a few ulp of
        ``|delta|``, scaled by ``softmax_scale * |k|`` in dq (``|q|`` in dk), not of the near-zero
        gradient. The rule of tests/test_triton_attention.py's ``_floor_eps``.
        """
        if direction == "fwd":
            return [hi.abs().max().item()]
        key = hi[0].dtype  # every implementation's check reuses them
        if key not in self._floor_mags:
            dtype = hi[0].dtype  # the high-precision reference's
            out = self.reference("fwd", dtype)
            q, k, _, dout = (t.to(dtype) for t in self.varlen)
            delta = (dout * out).sum(-1).abs().max().item()
            self._floor_mags[key] = [self.softmax_scale * delta * k.abs().max().item(),
                                     self.softmax_scale * delta * q.abs().max().item(),
                                     hi[2].abs().max().item()]
        return self._floor_mags[key]

    def reference(self, direction: str, dtype: torch.dtype):
        """The varlen reference (out, or (dq, dk, dv)) computed in ``dtype``."""
        q, k, v, dout = (t.to(dtype) for t in self.varlen)
        kw = dict(softmax_scale=self.softmax_scale)
        if direction == "fwd":
            return attention_varlen_math(q, k, v, self.cu_seqlens, self.seqlen, **kw)[0]
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention_varlen_math(q, k, v, self.cu_seqlens, self.seqlen, **kw)[0]
        return torch.autograd.grad(out, (q, k, v), dout)


def _fastbert(inp: _Inputs, backend: str, direction: str) -> Prepared:
    from fastbert.ops import attention

    q, k, v, dout = inp.varlen
    if direction == "bwd":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu, max_seqlen = inp.cu_seqlens, inp.seqlen

    def fwd():
        return attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, backend=backend)

    return prepare_timed(fwd, (q, k, v), dout, direction)


def _padded(inp: _Inputs, kind: str, direction: str) -> Prepared:
    """The padded competitors: "eager" (the reference composite), "sdpa", "compile"."""
    q, k, v, dout = inp.padded
    if direction == "bwd":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask, scale = inp.mask, inp.softmax_scale
    info = {}
    if kind == "sdpa":
        mask4 = mask[:, None, None, :]  # [B, 1, 1, Lk], True = attend
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        info["sdpa_backend"] = sdpa_backend_name(qt, kt, vt, mask4)

        def fwd():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask4, scale=scale).transpose(1, 2)
    else:
        fn = attention_math if kind == "eager" else torch.compile(attention_math, dynamic=False)

        def fwd():
            return fn(q, k, v, attention_mask=mask, softmax_scale=scale)[0]

    prepared = prepare_timed(fwd, (q, k, v), dout, direction, lambda t: t[mask])
    prepared.info.update(info)
    return prepared


def _flash_attn(inp: _Inputs, direction: str) -> Prepared:
    from flash_attn import flash_attn_varlen_func

    q, k, v, dout = inp.varlen
    if direction == "bwd":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu, L = inp.cu_seqlens, inp.seqlen

    def fwd():
        return flash_attn_varlen_func(q, k, v, cu, cu, L, L, softmax_scale=inp.softmax_scale)

    return prepare_timed(fwd, (q, k, v), dout, direction)


def _xformers(inp: _Inputs, direction: str) -> Prepared:
    from xformers.ops import fmha

    q, k, v, dout = inp.varlen
    if direction == "bwd":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    bias = fmha.BlockDiagonalMask.from_seqlens(list(inp.lengths))

    def fwd():  # xformers' packed layout is [1, total_tokens, heads, head_dim]
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                               scale=inp.softmax_scale)[0]

    return prepare_timed(fwd, (q, k, v), dout, direction)


def cases(opts: Options) -> list[Case]:
    """Every attention case of ``opts``: model shapes x sizes x directions."""
    out = []
    gpu = opts.device != "cpu"
    low_precision = opts.dtype in (torch.float16, torch.bfloat16)
    flash, flash_reason = optional_import("flash_attn") if gpu else (None, "flash-attn needs a CUDA GPU")
    xf, xf_reason = optional_import("xformers.ops") if gpu else (None, "xformers needs a CUDA GPU")
    if flash is not None and not low_precision:
        flash_reason = "flash-attn takes fp16/bf16 only"
    for model in opts.models:
        shape = MODEL_SHAPES[model]
        for seqlen, batch in sizes(opts):
            lengths = variable_lengths(batch, seqlen, opts.fill, opts.seed)
            inp = _Inputs(lengths, seqlen, shape.num_attention_heads, shape.head_dim, opts.dtype,
                          opts.device, opts.seed)
            fill = sum(lengths) / (batch * seqlen)
            for direction in opts.directions:
                feats = frozenset({"varlen"})
                call = CallInfo("attention", torch.device(opts.device).type, opts.dtype, shape.head_dim, feats)
                impls = [Impl(f"fastbert[{name}]", "fastbert", skip=reason, default=default,
                              prepare=lambda n=name, d=direction, i=inp: _fastbert(i, n, d))
                         for name, reason, default in fastbert_backends(call, opts)]
                impls += [Impl(f"torch-{kind}", "competitor", prepare=lambda k=kind, d=direction, i=inp: _padded(i, k, d))
                          for kind in ("eager", "sdpa")]
                impls.append(Impl("torch-compile", "competitor",
                                  prepare=lambda d=direction, i=inp: _padded(i, "compile", d),
                                  skip=None if opts.compile else "torch.compile competitors are off (--quick or --no-compile)"))
                impls.append(Impl("flash-attn", "competitor", skip=flash_reason,
                                  prepare=lambda d=direction, i=inp: _flash_attn(i, d)))
                impls.append(Impl("xformers", "competitor", skip=xf_reason,
                                  prepare=lambda d=direction, i=inp: _xformers(i, d)))
                hi_dtype = torch.float32 if gpu else torch.float64
                out.append(Case(
                    op="attention", direction=direction,
                    label=f"{model} b{batch} s{seqlen} h{shape.num_attention_heads} d{shape.head_dim} fill{fill:.2f}",
                    params=dict(model=model, batch=batch, seqlen=seqlen, num_heads=shape.num_attention_heads,
                                head_dim=shape.head_dim, fill=fill, seqlens=list(lengths)),
                    x=seqlen, x_tick=f"{batch}x{seqlen}", x_name=_X_NAME if not opts.batch else
                    f"batch x seqlen (batch fixed at {batch})", dtype=opts.dtype, device=opts.device,
                    work=attention_flops(lengths, shape.num_attention_heads, shape.head_dim, direction),
                    reference=lambda i=inp, d=direction, h=hi_dtype: (i.reference(d, h), i.reference(d, i.dtype)),
                    impls=impls, floor_mags=lambda hi, i=inp, d=direction: i.floor_mags(d, hi),
                    # fp32: kernel and PyTorch errors are both a few ulp from different summation
                    # orders, their ratio is noise (as in the parity tests)
                    floor_eps=16.0 if opts.dtype == torch.float32 else 8.0,
                    notes=["padded competitors compute padding rows; FLOPs count valid pairs only"]))
    return out
