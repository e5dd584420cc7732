"""The ONE list of bias-GELU parity cases, run by every backend's parity test (``torch`` in
test_gelu.py, ``cuda-host`` on the CPU and ``cuda`` on a GPU in test_cuda_gelu.py), and the case
type, inputs and check that GeGLU's cases (``GegluCase``, test_cuda_geglu.py) share with them.

Each case runs y = GELU(x + bias) forward and backward through ``fastbert.ops.gelu`` and compares
y, dx and dbias with the reference in fp64 and in the case's dtype (``_cases.check_runs``). Every
axis value appears at least once: fp32/fp16/bf16; exact and tanh form; bias absent, in x's dtype
or fp32; hidden 24 / 96 / 384 / 1023 / 1536 / 3072 (vector path and scalar tails); 1 to 40 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from _cases import BF16, F16, F32, check_runs, randn

import fastbert.ops


@dataclass(frozen=True)
class GeluCase:
    rows: int
    hidden: int  # y's width
    dtype: torch.dtype
    bias: str = "x"  # "x" (x's dtype) | "fp32" | "none"
    approximate: str = "none"
    op: ClassVar[str] = "gelu"  # the fastbert.ops function
    gate: ClassVar[int] = 1  # x and bias are gate * hidden wide

    def __str__(self) -> str:
        width = self.hidden if self.gate == 1 else f"{self.gate}*{self.hidden}"
        return f"{self.rows}x{width}-{str(self.dtype)[6:]}-bias_{self.bias}-{self.approximate}"


class GegluCase(GeluCase):
    """A GeGLU case: ``hidden`` is the half width n (y is [rows, n]; x and bias are 2n wide)."""

    op = "geglu"
    gate = 2


GELU_CASES = (
    GeluCase(5, 1023, F32, "fp32"),
    GeluCase(4, 384, F16, "x", "tanh"),
    GeluCase(3, 1536, BF16, "none"),
    GeluCase(6, 384, BF16, "fp32", "tanh"),
    GeluCase(40, 24, F16, "x"),
    GeluCase(2, 1023, F16, "fp32", "tanh"),
    GeluCase(3, 1536, F32, "none", "tanh"),
) + tuple(GeluCase(rows, hidden, dtype, bias, approximate)
          for rows, hidden, approximate, bias in ((1, 384, "none", "x"), (7, 1023, "tanh", "x"),
                                                  (3, 3072, "none", "none"), (5, 96, "tanh", "none"))
          for dtype in (F32, F16, BF16))


def gelu_inputs(case: GeluCase, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + case.rows * 104729 + case.hidden)
    width = case.gate * case.hidden
    t = {"x": randn(g, case.rows, width, scale=3.0)}  # both GELU tails (GeGLU: gates of either sign)
    if case.bias != "none":
        t["bias"] = randn(g, width, scale=0.5)
    t["dy"] = randn(g, case.rows, case.hidden)
    return t


def _run(case: GeluCase, inputs: dict, backend: str, device, dtype) -> dict:
    x = inputs["x"].to(device=device, dtype=dtype).requires_grad_()
    leaves = [x]
    bias = None
    if "bias" in inputs:
        bias = inputs["bias"].to(device=device, dtype=torch.float32 if case.bias == "fp32" and dtype != torch.float64
                                 else dtype).requires_grad_()
        leaves.append(bias)
    y = getattr(fastbert.ops, case.op)(x, bias=bias, approximate=case.approximate, backend=backend)
    grads = torch.autograd.grad(y, leaves, inputs["dy"].to(device=device, dtype=y.dtype))
    return dict(zip(("y", "dx", "dbias"), (y, *grads)))


def check_gelu_case(case: GeluCase, backend: str, device) -> None:
    """Output and every gradient of ``case`` (GELU or GeGLU) on ``backend`` vs the reference (fp64 and
    low precision)."""
    check_runs(case, lambda inputs, b, dev, dt: _run(case, inputs, b, dev, dt), gelu_inputs(case), backend, device)
