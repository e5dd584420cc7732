"""The ONE list of CUDA parity cases for LayerNorm and GELU, run by the ``cuda-host`` tests on the
CPU (CI) and by the ``gpu``-marked ``cuda`` tests on a GPU (device check), plus the checks both run.

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
from _tolerance import assert_close_to_ref

from fastbert.ops import gelu, layer_norm

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
