"""STYLE.md's tolerance rule, shared by every parity test.

Run the op under test in low precision, the reference in high precision (fp32/fp64) and the
reference again in the op's low precision. The op's error against the high-precision reference
must be at most ``factor`` times PyTorch's own low-precision error (2x for ops, 3x for a whole
encoder), with a floor of a few machine epsilons of the dtype times the output's magnitude, so a
case where PyTorch happens to be exact does not demand exactness.
"""

from __future__ import annotations

import torch

# fp64 runs check the math, not rounding: threaded reductions reorder sums by a few hundred ulps.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-44}


def assert_close_to_ref(out, ref_hi, ref_lo=None, *, factor: float = 2.0, floor_eps: float = 4.0,
                        name: str = "out") -> None:
    """Assert ``max|out - ref_hi| <= max(factor * max|ref_lo - ref_hi|, floor)``.

    ``floor = floor_eps * eps(out.dtype) * max(1, max|ref_hi|)``. NaN anywhere fails.
    """
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    o, r = out.double(), ref_hi.double()
    err = (o - r).abs().max().item() if o.numel() else 0.0
    mag = max(1.0, r.abs().max().item() if r.numel() else 0.0)
    floor = floor_eps * EPS[out.dtype] * mag
    base = 0.0
    if ref_lo is not None:
        base = (ref_lo.double() - r).abs().max().item() if r.numel() else 0.0
    tol = max(factor * base, floor)
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e} (pytorch low-precision error {base:.3e}, floor {floor:.3e})"
