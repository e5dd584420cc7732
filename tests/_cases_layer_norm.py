"""The ONE list of LayerNorm parity cases, run by every backend's parity test (``torch`` in
test_layer_norm.py, ``cuda-host`` on the CPU and ``cuda`` on a GPU in test_cuda_layer_norm.py).

Each case runs y = LayerNorm(dropout(x + x_bias) + residual) forward and backward through
``fastbert.ops.layer_norm`` and compares y and every input gradient with the reference in fp64
and in the case's dtype (``_cases.check_runs``). Every axis value appears at least once:
fp32/fp16/bf16; hidden 1 / 40 / 384 / 768 / 1023 / 1024 / 1536 / 4096 (16-byte vector path and
scalar tails); weight/bias absent, weight only, in x's dtype or fp32; x_bias in fp32 or in x's
dtype beside fp32 parameters; residual, dropout; rows past one column split (> 32 rows); eps 1e-5
and 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from _cases import BF16, F16, F32, check_runs, randn

from fastbert.ops import layer_norm


@dataclass(frozen=True)
class LayerNormCase:
    rows: int
    hidden: int
    dtype: torch.dtype
    params: str = "fp32"  # "fp32" | "x" (x's dtype) | "weight" (weight only, fp32) | "none"
    residual: bool = False
    x_bias: bool = False
    dropout_p: float = 0.0
    x_bias_in_x: bool = False  # x_bias in x's dtype beside fp32 parameters (else it follows them)
    eps: float = 1e-5

    def __str__(self) -> str:
        fused = "+".join(n for n, on in (("res", self.residual), ("xb" + "x" * self.x_bias_in_x, self.x_bias),
                                         (f"p{self.dropout_p}", self.dropout_p > 0)) if on) or "plain"
        eps = "" if self.eps == 1e-5 else f"-eps{self.eps:g}"
        return f"{self.rows}x{self.hidden}-{str(self.dtype)[6:]}-{self.params}-{fused}{eps}"


def _fusions(rows: int, hidden: int, dtype, fusion: str) -> LayerNormCase:
    """The add & norm fusions at eps 1e-12 (BERT's), x_bias and residual in x's dtype."""
    on = {"none": (), "residual": ("res",), "x_bias": ("xb",), "dropout": ("p",), "all": ("res", "xb", "p")}[fusion]
    return LayerNormCase(rows, hidden, dtype, "fp32", residual="res" in on, x_bias="xb" in on,
                         dropout_p=0.1 if "p" in on else 0.0, x_bias_in_x="xb" in on, eps=1e-12)


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
) + tuple(_fusions(rows, hidden, dtype, fusion)
          for rows, hidden, fusion in ((1, 384, "none"), (3, 768, "residual"), (17, 1023, "x_bias"),
                                       (3, 1536, "all"), (5, 1024, "dropout"), (2, 4096, "all"))
          for dtype in (F32, F16, BF16))


def layer_norm_inputs(case: LayerNormCase, seed: int = 0) -> dict:
    """fp64 master copies of the case's inputs (cast per run), keyed by argument name."""
    g = torch.Generator().manual_seed(seed + case.rows * 7919 + case.hidden)
    t = {"x": randn(g, case.rows, case.hidden, scale=2.0) + 0.5}
    if case.params in ("fp32", "x", "weight"):
        t["weight"] = 1.0 + randn(g, case.hidden, scale=0.3)
    if case.params in ("fp32", "x"):
        t["bias"] = randn(g, case.hidden, scale=0.3)
    if case.residual:
        t["residual"] = randn(g, case.rows, case.hidden)
    if case.x_bias:
        t["x_bias"] = randn(g, case.hidden, scale=0.3)
    t["dy"] = randn(g, case.rows, case.hidden)
    return t


def _run(case: LayerNormCase, inputs: dict, backend: str, device, dtype) -> dict:
    names = [n for n in ("x", "weight", "bias", "residual", "x_bias") if n in inputs]
    param_dtype = dtype if dtype == torch.float64 or case.params == "x" else torch.float32

    def cast(n):
        dt = param_dtype if n in ("weight", "bias") else dtype
        if n == "x_bias" and case.params != "x" and not case.x_bias_in_x and dtype != torch.float64:
            dt = torch.float32  # fp32 x_bias beside low-precision x in the fp32-parameter cases
        return inputs[n].to(device=device, dtype=dt).requires_grad_()

    leaves = {n: cast(n) for n in names}
    torch.manual_seed(1234)  # the dropout seed: the same draw for every run on this device
    y = layer_norm(leaves["x"], leaves.get("weight"), leaves.get("bias"), eps=case.eps,
                   residual=leaves.get("residual"), x_bias=leaves.get("x_bias"),
                   dropout_p=case.dropout_p, backend=backend)
    dy = inputs["dy"].to(device=device, dtype=y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return {"y": y, **{"d" + n: g for n, g in zip(leaves, grads)}}


def check_layer_norm_case(case: LayerNormCase, backend: str, device) -> None:
    """Output and every gradient of ``case`` on ``backend`` vs the reference (fp64 and low precision)."""
    check_runs(case, lambda inputs, b, dev, dt: _run(case, inputs, b, dev, dt), layer_norm_inputs(case),
               backend, device)
