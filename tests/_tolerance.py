"""STYLE.md's tolerance rule, shared by every parity test (its formula and epsilons are
``fastbert.bench.core.tolerance`` / ``EPS``, the one source the benchmarks' check uses too).

Run the op under test in low precision, the reference in high precision (fp32/fp64) and the
reference again in the op's low precision. The op's error against the high-precision reference
must be at most ``factor`` times PyTorch's own low-precision error (2x for ops, 3x for a whole
encoder), with a floor of a few machine epsilons of the dtype times the output's magnitude, so a
case where PyTorch happens to be exact does not demand exactness.
"""

from __future__ import annotations

import math

import torch

from fastbert.bench.core import EPS, tolerance

__all__ = ["EPS", "assert_close_to_ref", "attention_floor_eps"]


def assert_close_to_ref(out, ref_hi, ref_lo=None, *, factor: float = 2.0, floor_eps: float = 4.0,
                        name: str = "out") -> None:
    """Assert ``max|out - ref_hi| <= max(factor * max|ref_lo - ref_hi|, floor)``.

    ``floor = floor_eps * eps(out.dtype) * max(1, max|ref_hi|)``. NaN anywhere fails.
    """
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    o, r = out.double(), ref_hi.double()
    err = (o - r).abs().max().item() if o.numel() else 0.0
    mag = r.abs().max().item() if r.numel() else 0.0
    base = 0.0
    if ref_lo is not None:
        base = (ref_lo.double() - r).abs().max().item() if r.numel() else 0.0
    tol = tolerance(base, mag, out.dtype, factor, floor_eps)
    floor = tolerance(0.0, mag, out.dtype, factor, floor_eps)
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e} (pytorch low-precision error {base:.3e}, floor {floor:.3e})"


def attention_floor_eps(name: str, hi: dict, *, dout, q, k, dtype, head_dim: int, seqlen_k: int,
                        bias_dtype=None) -> float:
    """The attention rule's floor (in eps of ``dtype``, relative to max(1, |hi[name]|)) for output
    ``name`` of a FlashAttention-style backward; ``hi`` holds the fp64 reference's outputs, ``dout``
    the output gradient, ``q`` / ``k`` the inputs (a packed QKV tensor for both when packed).

    FA2's ``D = rowsum(dO * O)`` from the stored, rounded O cancels against ``dP = dO V^T`` in
    ``dS = P * (dP - D)``. Where the true dS is ~0 (one key: P = 1) the kernel keeps a few ulp of
    ``|D|`` while the reference, taking D from dP itself, cancels exactly, so PyTorch's own error is
    0 and only the floor applies. The magnitude that cancels is ``|D|`` for dS (times ``sqrt(n)``
    for a broadcast bias, a sum of n entries; times eps(dtype) / eps(bias_dtype) for a bias in a
    finer dtype than the computation) and ``softmax_scale * |D| * |k|`` (``|q|``) for dq (dk). fp32
    gets 16 eps (both errors are a few ulp from different summation orders and the recomputed P,
    their ratio is noise), other dtypes 4.
    """
    few = 16.0 if dtype == torch.float32 else 4.0
    if name in ("out", "dv") or not hi["out"].numel():
        return few
    delta = (dout.double().cpu() * hi["out"].double().cpu()).sum(-1).abs().max().item()
    ref_mag = max(1.0, hi[name].abs().max().item()) if hi[name].numel() else 1.0
    if name == "dbias":
        n_full = hi["dq"].numel() // head_dim * max(seqlen_k, 1)
        mag = delta * math.sqrt(n_full / max(hi["dbias"].numel(), 1))
        mag *= max(1.0, EPS[dtype] / EPS[bias_dtype or dtype])
    else:
        other = k if name == "dq" else q
        other = other[other.isfinite()] if other.numel() else other
        mag = head_dim ** -0.5 * delta * (other.abs().max().item() if other.numel() else 0.0)
    return few * max(1.0, mag) / ref_mag
