"""Differential fuzzing of LayerNorm and GELU: case generation, running one case on one backend,
and the comparison against the reference (used by tests/test_fuzz_norm.py).

A case is a small JSON-able dict drawn from a seeded ``random.Random`` (so a failure prints an
input that reproduces it: ``check_case(case, backend)``). Every tensor argument is made from a
*base* tensor and a *view* of it -- ``contig``, ``strided`` (every other element of a wider base),
``expanded`` (stride 0 over a size-1 base), ``offset`` (a slice one element into a base, so the
data pointer is not 16-byte aligned) -- and gradients are taken with respect to the bases, so
the backend under test sees the views while every run differentiates the same leaves.

Each run is compared with the reference in fp64 (the arbiter) and in the case's own dtypes,
by tests/_tolerance.py's rule. A gradient that sums ``n`` elements into one (dweight, dbias,
dx_bias, the base of an expanded view) gets a floor of ``4 sqrt(n)`` eps instead of 4 eps:
its rounding noise grows with the terms, not with the (possibly cancelling) result. Non-finite
reference values (GELU of +-inf) must be matched exactly, position by position.

Run as a script (``python tests/_fuzz_norm.py < cases.json``) it checks a list of
``[case, backend]`` pairs, printing ``START i`` before and ``PASS i`` / ``FAIL i message`` after
each: the test runs the cuda-host cases that way, so a crash of the C++ code fails the case it
died in instead of the test run.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = {"fp16": F16, "bf16": BF16, "fp32": F32, "fp64": F64}
BACKENDS = ("torch", "triton", "cuda-host")
VIEWS = ("contig", "strided", "expanded", "offset")
HIDDENS = (1, 2, 3, 7, 13, 31, 64, 97, 128, 384, 1023, 1536)
ROWS = (1, 2, 3, 5, 7, 13, 31)
# Constant rows use values whose sums are exact in fp32 (<= 11 significant bits, hidden <= 2^11),
# so a correct kernel returns exactly bias there whatever its summation order.
CONSTANTS = (154.125, -100.0, 3.5, 0.0)
GELU_TAILS = (-5.0, -8.0, -12.0, -30.0, -100.0, -1000.0)


# ---- cases ---------------------------------------------------------------------------------------


def _shape(rng: random.Random, max_elems: int) -> list[int]:
    if rng.random() < 0.06:  # empty: no rows, or (GELU and LayerNorm alike) hidden 0
        return rng.choice([[0, rng.choice(HIDDENS)], [3, 0], [2, 0, 5]])
    hidden = rng.choice(HIDDENS)
    rows = rng.choice(ROWS)
    while rows > 1 and rows * hidden > max_elems:
        rows //= 2
    if rows >= 4 and rng.random() < 0.3:  # leading dims (batch, seqlen)
        return [2, rows // 2, hidden]
    return [rows, hidden]


def _dtype(rng: random.Random) -> str:
    return rng.choices(("fp32", "fp16", "bf16", "fp64"), weights=(4, 3, 3, 1))[0]


def layer_norm_case(rng: random.Random, seed: int, max_elems: int = 4096) -> dict:
    """One random LayerNorm input: shape, dtypes, fusions, views, eps, special rows."""
    dt = _dtype(rng)
    pdt = lambda: rng.choice((None, dt, "fp32"))  # noqa: E731  parameter dtype (None = absent)
    c = dict(op="layer_norm", seed=seed, shape=_shape(rng, max_elems), dtype=dt,
             weight=pdt(), bias=pdt(), x_bias=pdt() if rng.random() < 0.5 else None,
             residual=rng.random() < 0.5, dropout_p=rng.choice((0.0, 0.0, 0.1, 0.5)),
             eps=rng.choice((1e-12, 1e-5, 1e-6)), scale=rng.choice((1.0, 1.0, 0.01, 30.0)),
             offset=rng.choice((0.0, 0.0, 3.0, 50.0)), views={})
    for name in ("x", "residual", "weight", "bias", "x_bias"):
        c["views"][name] = rng.choices(VIEWS, weights=(4, 2, 1, 1))[0]
    fused = c["residual"] or c["x_bias"] or c["dropout_p"] > 0
    if dt == "fp16" and c["dropout_p"] > 0 and not c["residual"]:
        c["eps"] = max(c["eps"], 1e-6)  # a row dropout zeroes whole is constant: see below
    # Constant rows (aten's ill-conditioned case) only where h is x; not with eps 1e-12 in fp16,
    # where the true gradient (~1e6) overflows.
    c["constant_row"] = (not fused and not (dt == "fp16" and c["eps"] < 1e-6) and rng.random() < 0.3
                         and rng.choice(CONSTANTS))
    return c


def gelu_case(rng: random.Random, seed: int, max_elems: int = 4096) -> dict:
    """One random GELU input: shape, dtypes, bias and its view, approximate, tails."""
    dt = _dtype(rng)
    return dict(op="gelu", seed=seed, shape=_shape(rng, max_elems), dtype=dt,
                bias=rng.choice((None, dt, "fp32")), approximate=rng.choice(("none", "tanh")),
                scale=rng.choice((1.0, 3.0)), tails=rng.random() < 0.4, inf=rng.random() < 0.15,
                views={"x": rng.choices(VIEWS, weights=(4, 2, 1, 1))[0],
                       "bias": rng.choices(VIEWS, weights=(4, 2, 1, 1))[0]})


def cases(op: str, n: int, seed: int, max_elems: int = 4096) -> list[dict]:
    """``n`` cases of ``op`` from one seeded generator (case i has seed ``seed * 100003 + i``)."""
    rng = random.Random(seed)
    make = layer_norm_case if op == "layer_norm" else gelu_case
    return [make(rng, seed * 100003 + i, max_elems) for i in range(n)]


def case_id(c: dict) -> str:
    shape = "x".join(map(str, c["shape"]))
    if c["op"] == "gelu":
        return f"gelu-{c['seed']}-{shape}-{c['dtype']}-b{c['bias']}-{c['approximate']}"
    fused = "".join(k[0] for k in ("residual", "x_bias") if c[k]) + ("d" if c["dropout_p"] else "")
    return f"ln-{c['seed']}-{shape}-{c['dtype']}-w{c['weight']}-b{c['bias']}-{fused or 'plain'}"


# ---- inputs: bases and views ---------------------------------------------------------------------


def _base(shape, view, gen, fill):
    """fp64 base tensor for a view of ``shape``; ``fill(shape)`` draws values."""
    shape = list(shape)
    if view == "strided" and shape and shape[-1] > 0:
        return fill(shape[:-1] + [2 * shape[-1]])
    if view == "expanded":
        return fill([1] * len(shape)) if len(shape) == 1 else fill([1] + shape[1:])
    if view == "offset":
        return fill([math.prod(shape) + 1])
    return fill(shape)


def _view(base, shape, view):
    if view == "strided" and shape[-1] > 0:
        return base[..., ::2]
    if view == "expanded":
        return base.expand(*shape)
    if view == "offset":
        return base[1:].view(*shape)
    return base


def _fan_in(shape, view) -> int:
    """How many elements of the view share one element of its base (1 unless expanded)."""
    return max(1, shape[0]) if view == "expanded" else 1


def make_inputs(c: dict) -> dict:
    """fp64 bases ``{name: (base, view, shape)}`` of the case's tensor arguments, plus ``dy``."""
    gen = torch.Generator().manual_seed(c["seed"])
    randn = lambda s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    shape = c["shape"]
    hidden = shape[-1]
    out = {}
    if c["op"] == "layer_norm":
        x = _base(shape, c["views"]["x"], gen, lambda s: c["offset"] + c["scale"] * randn(s))
        if c["constant_row"] is not False and x.numel() and c["views"]["x"] != "expanded" and x.dim() >= 2:
            x.view(-1, x.shape[-1])[0] = c["constant_row"]  # first row of the base: a constant row
        out["x"] = (x, c["views"]["x"], shape)
        if c["residual"]:
            out["residual"] = (_base(shape, c["views"]["residual"], gen, randn), c["views"]["residual"], shape)
        for name, scale, center in (("weight", 0.5, 1.0), ("bias", 0.5, 0.0), ("x_bias", 0.5, 0.0)):
            if c[name] is not None:
                b = _base([hidden], c["views"][name], gen, lambda s: center + scale * randn(s))
                out[name] = (b, c["views"][name], [hidden])
    else:
        def fill(s):
            z = c["scale"] * randn(s)
            if c["tails"] and z.numel():
                flat = z.view(-1)
                idx = torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 8)]
                flat[idx] = torch.tensor(GELU_TAILS, dtype=F64)[torch.randint(len(GELU_TAILS), (idx.numel(),),
                                                                               generator=gen)]
            if c["inf"] and z.numel():
                z.view(-1)[0] = float("inf")
                z.view(-1)[-1] = float("-inf")
            return z
        out["x"] = (_base(shape, c["views"]["x"], gen, fill), c["views"]["x"], shape)
        if c["bias"] is not None:
            out["bias"] = (_base([hidden], c["views"]["bias"], gen, lambda s: 0.5 * randn(s)), c["views"]["bias"],
                           [hidden])
    out["dy"] = (randn(shape), "contig", shape)
    return out


# ---- running and comparing -----------------------------------------------------------------------


def _dtype_of(c: dict, name: str, cast) -> torch.dtype:
    """The dtype of argument ``name`` in a run whose x dtype is ``cast`` (fp64 everywhere for the
    arbiter; otherwise parameters keep their declared dtype)."""
    if cast == F64:
        return F64
    declared = c.get(name) if name in ("weight", "bias", "x_bias") else None
    return DTYPES[declared] if isinstance(declared, str) else cast


def run(c: dict, backend: str, cast: torch.dtype | None = None) -> dict:
    """Forward + backward of case ``c`` on ``backend`` with x in ``cast`` (the case's dtype when
    None); returns ``{"y": ..., "d<name>": ...}`` with gradients w.r.t. the bases."""
    from fastbert.ops import gelu, layer_norm

    cast = DTYPES[c["dtype"]] if cast is None else cast
    inputs = make_inputs(c)
    leaves, views = {}, {}
    for name, (base, view, shape) in inputs.items():
        if name == "dy":
            continue
        leaves[name] = base.to(_dtype_of(c, name, cast)).requires_grad_()
        views[name] = _view(leaves[name], shape, view)
    torch.manual_seed(c["seed"])  # the same dropout seed for every backend
    if c["op"] == "layer_norm":
        y = layer_norm(views["x"], views.get("weight"), views.get("bias"), eps=c["eps"],
                       residual=views.get("residual"), x_bias=views.get("x_bias"), dropout_p=c["dropout_p"],
                       backend=backend)
    else:
        y = gelu(views["x"], bias=views.get("bias"), approximate=c["approximate"], backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), inputs["dy"][0].to(y.dtype), allow_unused=True)
    out = {"y": y.detach()}
    for name, g in zip(leaves, grads):
        out["d" + name] = torch.zeros_like(leaves[name]) if g is None else g
    return out


def _dh_scale(c: dict) -> float:
    """``max(rstd * |g| * (2 + xhat^2)) / (1 - p)`` over the rows, in fp64: the size of the terms LayerNorm's
    ``dh = rstd * (g - mean(g) - xhat * mean(g * xhat))`` cancels down to (on a short row, dh can
    be far smaller than them, and every formula keeps an error of a few eps of them)."""
    from fastbert.ops._common import draw_seed

    if 0 in c["shape"]:
        return 0.0
    inputs = make_inputs(c)
    v = {k: _view(b, s, view) for k, (b, view, s) in inputs.items()}
    hidden = c["shape"][-1]
    rows = lambda t: None if t is None else t.reshape(-1, hidden).contiguous()  # noqa: E731
    vec = lambda t: None if t is None else t.contiguous()  # noqa: E731
    torch.manual_seed(c["seed"])  # the seed layer_norm() draws first
    seed = draw_seed(torch.device("cpu")) if c["dropout_p"] > 0 else None
    _, mean, rstd, h = torch.ops.fastbert.layer_norm_fwd(
        rows(v["x"]), vec(v.get("weight")), vec(v.get("bias")), rows(v.get("residual")), vec(v.get("x_bias")),
        seed, c["eps"], c["dropout_p"], "reference")
    h = rows(v["x"]) if h.numel() == 0 else h  # h is x when nothing is fused
    xhat = (h - mean[:, None]) * rstd[:, None]
    g = rows(v["dy"]) * (1.0 if "weight" not in v else v["weight"])
    # |g|, |mean(g)| and |xhat * mean(g * xhat)| are each at most |g| (1, 1, max xhat^2) per row.
    terms = rstd * g.abs().amax(-1) * (2.0 + xhat.square().amax(-1))
    return terms.max().item() / (1.0 - c["dropout_p"])  # dx = dh * keep / (1 - p)


def _floor_eps(c: dict, name: str, ref: torch.Tensor) -> float:
    """4 eps (8 for GELU's gradient: aten's fp32 tanh backward alone errs by 1e-6 per unit dy),
    times sqrt(terms summed into one element) for reduced gradients, and for LayerNorm's dx /
    dresidual relative to the terms of dh (:func:`_dh_scale`) rather than to dh."""
    if name == "y":
        return 4.0
    if c["op"] == "gelu" and name == "dx":
        return 8.0
    if c["op"] == "layer_norm" and name in ("dx", "dresidual") and ref.numel():
        return 4.0 * max(1.0, _dh_scale(c) / max(1.0, ref.abs().max().item()))
    arg = name[1:]
    rows = math.prod(c["shape"][:-1])
    view = c["views"].get(arg, "contig")
    if arg in ("weight", "bias", "x_bias"):
        n = rows * (c["shape"][-1] if view == "expanded" else 1)
    else:
        n = _fan_in(c["shape"], view) if view == "expanded" else 1
    return 4.0 * max(1.0, math.sqrt(n))


def compare(c: dict, got: dict, hi: dict, lo: dict, posinf_nan: bool = False) -> None:
    """AssertionError naming the output unless every output follows the tolerance rule.
    ``posinf_nan``: y may be NaN where the reference is +inf (aten's AVX512 fp32 erf GELU)."""
    from _tolerance import assert_close_to_ref

    assert got.keys() == hi.keys(), (sorted(got), sorted(hi))
    for name in got:
        g, h, l = got[name], hi[name], lo[name]
        assert g.dtype == l.dtype, f"{name}: dtype {g.dtype}, reference {l.dtype}"
        bad = ~torch.isfinite(h)
        if bad.any():  # GELU of +-inf: the non-finite pattern must match the arbiter's exactly
            gb, hb = g[bad].double(), h[bad]
            same = (gb.isnan() & hb.isnan()) | (gb == hb)
            if posinf_nan and name == "y":
                same |= gb.isnan() & (hb == float("inf"))
            assert same.all(), f"{name}: non-finite values {gb[~same].tolist()[:4]}, reference {hb[~same].tolist()[:4]}"
            g, h, l = (torch.where(bad, 0, t) for t in (g, h, l))
        assert_close_to_ref(g, h, l, floor_eps=_floor_eps(c, name, h), name=name)


def available(c: dict, backend: str) -> str | None:
    """Why ``backend`` cannot run case ``c`` (None when it can): the dispatcher's own reasons."""
    from fastbert.backends import CallInfo, get_backend

    feats = set()
    if c["op"] == "layer_norm":
        feats = {n for n in ("weight", "bias", "x_bias") if c[n] is not None}
        feats |= {"residual"} if c["residual"] else set()
        feats |= {"dropout"} if c["dropout_p"] > 0 else set()
    elif c["bias"] is not None:
        feats = {"bias"}
    reasons = get_backend(backend).reasons(CallInfo(c["op"], "cpu", DTYPES[c["dtype"]], None, frozenset(feats)))
    return "; ".join(reasons) or None


def check_case(c: dict, backend: str) -> None:
    """Run case ``c`` on ``backend`` and on the reference (fp64 and the case's dtypes); compare."""
    from fastbert.ops import poisoned_outputs

    with poisoned_outputs(True):
        got = run(c, backend)
        hi = run(c, "reference", F64)
        lo = run(c, "reference")
    compare(c, got, hi, lo, posinf_nan=_aten_posinf_nan(c, backend))


def _aten_posinf_nan(c: dict, backend: str) -> bool:
    """Whether this case runs aten's fp32 erf GELU where it gives NaN for +inf (documented in
    ``fastbert.backends.torch.gelu.gelu_fwd``)."""
    if not (backend == "torch" and c["op"] == "gelu" and c["dtype"] == "fp32" and c.get("approximate") == "none"):
        return False
    from fastbert.backends.torch.gelu import aten_erf_gelu_nan_at_posinf

    return aten_erf_gelu_nan_at_posinf()


def _main() -> None:
    """Check ``[[case, backend], ...]`` from stdin, one line of progress per case."""
    crash_at = int(os.environ.get("FUZZ_NORM_CRASH_AT", "-1"))  # the harness's own test
    for i, (c, backend) in enumerate(json.load(sys.stdin)):
        print(f"START {i}", flush=True)
        if i == crash_at:
            os.abort()
        try:
            check_case(c, backend)
        except AssertionError as exc:
            print(f"FAIL {i} {json.dumps(str(exc))}", flush=True)
        except Exception as exc:  # a Python error of the backend: a failure of this case, not of the run
            print(f"FAIL {i} {json.dumps(f'{type(exc).__name__}: {exc}')}", flush=True)
        else:
            print(f"PASS {i}", flush=True)


if __name__ == "__main__":
    _main()
