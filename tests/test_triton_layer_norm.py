"""Triton LayerNorm (add & norm fusion) through ``fastbert.ops.layer_norm(..., backend="triton")``:
parity of the output and every gradient with the reference (STYLE.md's rule) on the one case list
every backend runs (``_cases_layer_norm``) plus many row tiles; ``-m slow``: the full product of
the axes below. Also the chunked path for wide rows, the dropout mask, edge values, 64-bit offsets,
determinism and the custom-op checks.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest). The interpreter rounds fp32 ->
bf16 by truncation; the kernels round bf16 by hand there (``cast_rne``), so bf16 is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases_layer_norm import LAYER_NORM_CASES, LayerNormCase, check_layer_norm_case
from _pairwise import full_product
from _tolerance import assert_close_to_ref

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastbert.backends import reference  # noqa: E402
from fastbert.backends._philox import dropout_scale, rows_keep_mask  # noqa: E402
from fastbert.backends.triton import layer_norm as tln  # noqa: E402
from fastbert.ops import layer_norm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The full product behind -m slow (eps 1e-12, BERT's): widths on each side of the vector paths,
# 1000 rows (many row tiles per backward program), every dtype and fusion.
FUSIONS = ("none", "residual+x_bias", "dropout", "all", "no_affine")
AXES = {
    "hidden": (384, 768, 1023, 1024, 1536, 4096),
    "rows": (1, 3, 1000),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "fusion": FUSIONS,
}


def _grid_case(hidden, rows, dtype, fusion) -> LayerNormCase:
    """One point of the grid as a shared case (x_bias in x's dtype beside fp32 parameters)."""
    fused = fusion in ("residual+x_bias", "all")
    return LayerNormCase(rows, hidden, dtype, "none" if fusion == "no_affine" else "fp32", residual=fused,
                         x_bias=fused, x_bias_in_x=fused, dropout_p=0.1 if fusion in ("dropout", "all") else 0.0,
                         eps=1e-12)


# Triton-only: 600 rows of 384, many row tiles (under the interpreter 128-row forward tiles and
# 64-row backward tiles, 10 of them over 8 backward programs, the last partial), every fusion on.
TRITON_CASES = (_grid_case(384, 600, torch.float16, "all"),)


def _inputs(rows, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(rows, hidden).to(dtype), weight=(1 + 0.1 * r(hidden)).float(), bias=(0.1 * r(hidden)).float(),
                residual=r(rows, hidden).to(dtype), x_bias=(0.1 * r(hidden)).to(dtype),
                dy=r(rows, hidden).to(dtype))


@pytest.mark.parametrize("case", LAYER_NORM_CASES + TRITON_CASES, ids=str)
def test_triton_layer_norm_matches_reference(case, poison):
    check_layer_norm_case(case, "triton", DEV)


@pytest.mark.slow
@pytest.mark.parametrize("case", [_grid_case(**p) for p in full_product(AXES)], ids=str)
def test_parity_full(case, poison):
    check_layer_norm_case(case, "triton", DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parameters_in_x_dtype_and_fp32_x_bias(dtype, poison):
    """weight/bias in x's dtype and an fp32 x_bias beside low-precision x, dropout on, at 768."""
    rows, hidden = 7, 768
    t = {k: v.to(DEV) for k, v in _inputs(rows, hidden, dtype, seed=8).items()}
    out = {}
    for backend, cast in (("triton", dtype), ("reference", torch.float64), ("reference", dtype)):
        x, res, dy = (t[k].to(cast).requires_grad_() for k in ("x", "residual", "dy"))
        w, b = (t[k].to(cast).requires_grad_() for k in ("weight", "bias"))
        xb = t["x_bias"].to(torch.float64 if cast == torch.float64 else torch.float32).requires_grad_()
        torch.manual_seed(2)
        y = layer_norm(x, w, b, residual=res, x_bias=xb, dropout_p=0.1, backend=backend)
        out[(backend, cast)] = [y] + list(torch.autograd.grad(y, (x, w, b, res, xb), dy.detach()))
    names = ("y", "dx", "dweight", "dbias", "dresidual", "dx_bias")
    for i, name in enumerate(names):
        got, hi, lo = (out[k][i] for k in out)
        assert got.dtype == lo.dtype, name
        assert_close_to_ref(got.cpu(), hi.cpu(), lo.cpu(), name=name)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_chunked_path_matches_reference(dtype, poison):
    """Rows wider than one block (walked in chunks, Chan's merge of chunk statistics), forced with
    256-wide chunks so it runs on small inputs; every fusion on, dx_bias / dresidual included."""
    rows, hidden, p = 5, 1023, 0.2
    t = _inputs(rows, hidden, dtype, seed=3)
    t["x"] = (t["x"].double() + 50.0).to(dtype)  # a mean far from 0: the merge must stay stable
    t = {k: v.to(DEV) for k, v in t.items()}
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64, device=DEV)
    cfg_f, cfg_b = tln.fwd_config(hidden, block_n=256), tln.bwd_config(hidden, block_n=256)
    assert cfg_f.num_chunks == 4 and cfg_b.num_chunks == 4

    def fwd(mod, cast, **extra):
        x, res, xb = (t[k].to(cast) for k in ("x", "residual", "x_bias"))
        w, b = t["weight"].to(cast if cast == torch.float64 else torch.float32), t["bias"].to(
            cast if cast == torch.float64 else torch.float32)
        stat = torch.float64 if cast == torch.float64 else torch.float32
        y, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        mean, rstd = (torch.full((rows,), float("nan"), dtype=stat, device=DEV) for _ in range(2))
        mod.layer_norm_fwd(x, w, b, res, xb, y, mean, rstd, h, eps=1e-5, dropout_p=p, seed=seed, **extra)
        dy = t["dy"].to(cast)
        dx, dres = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        dw, db, dxb = (torch.full((hidden,), float("nan"), dtype=stat, device=DEV) for _ in range(3))
        mod.layer_norm_bwd(dy, h, w, mean, rstd, dx, dw, db, dres, dxb, dropout_p=p, seed=seed,
                           **({"config": cfg_b} if extra else {}))
        return dict(y=y, h=h, mean=mean, rstd=rstd, dx=dx, dres=dres, dw=dw, db=db, dxb=dxb)

    got = fwd(tln, dtype, config=cfg_f)
    hi = fwd(reference, torch.float64)
    lo = fwd(reference, dtype)
    for name in got:
        assert_close_to_ref(got[name].cpu(), hi[name].cpu(), lo[name].cpu(), name=name)


def test_dropout_mask_equals_reference():
    rows, hidden, p = 37, 300, 0.3
    x = torch.randn(rows, hidden, device=DEV) + 3.0  # no zeros: h == 0 exactly where dropped
    seed = torch.tensor([0x12345678, 0x9ABCDEF0], dtype=torch.int64, device=DEV)
    y, h = torch.empty_like(x), torch.full_like(x, float("nan"))
    mean, rstd = torch.empty(rows, device=DEV), torch.empty(rows, device=DEV)
    tln.layer_norm_fwd(x, None, None, None, None, y, mean, rstd, h, eps=1e-5, dropout_p=p, seed=seed)
    keep = rows_keep_mask(seed, p, rows, hidden)
    assert torch.equal(h != 0, keep)
    torch.testing.assert_close(h, x * keep * dropout_scale(p), rtol=1e-6, atol=0)
    dx = torch.full_like(x, float("nan"))
    tln.layer_norm_bwd(torch.randn(rows, hidden, device=DEV), h, None, mean, rstd, dx, None, None, None, None, dropout_p=p,
                       seed=seed)
    assert torch.equal(dx != 0, keep)


def test_dropout_through_ops_matches_reference():
    """Same seed, same mask: y of the triton and reference backends agree to fp32 rounding."""
    t = {k: v.to(DEV) for k, v in _inputs(64, 384, torch.float32, seed=5).items()}
    ys = []
    for backend in ("triton", "reference"):
        torch.manual_seed(7)
        ys.append(layer_norm(t["x"], t["weight"], t["bias"], residual=t["residual"], x_bias=t["x_bias"],
                             dropout_p=0.5, backend=backend))
    torch.testing.assert_close(ys[0], ys[1], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_mean_unit_spread(dtype, poison):
    x = (2000.0 + torch.randn(6, 768, dtype=torch.float64)).to(dtype).to(DEV)
    y = layer_norm(x, backend="triton")
    hi = F.layer_norm(x.double(), (768,))
    lo = layer_norm(x, backend="reference")
    assert_close_to_ref(y, hi, lo, name="y")
    # with the residual fused: the statistics see the rounded sum, like the reference in x's dtype
    r = (1000.0 + torch.randn(6, 768, dtype=torch.float64)).to(dtype).to(DEV)
    y = layer_norm(x, residual=r, backend="triton")
    assert_close_to_ref(y, layer_norm(x.double(), residual=r.double(), backend="reference"),
                        layer_norm(x, residual=r, backend="reference"), name="y fused")


def test_large_magnitudes_fp16(poison):
    t = {k: v.to(DEV) for k, v in _inputs(8, 1024, torch.float16, seed=9).items()}
    x = (t["x"].double() * 2e4).clamp(-3e4, 3e4).half()
    res = (t["residual"].double() * 1e4).clamp(-3e4, 3e4).half()
    out = {}
    for backend, cast in (("triton", torch.float16), ("reference", torch.float64), ("reference", torch.float16)):
        xx, rr = x.to(cast).requires_grad_(), res.to(cast).requires_grad_()
        y = layer_norm(xx, t["weight"].to(cast if cast == torch.float64 else torch.float32), None, residual=rr,
                       backend=backend)
        out[(backend, cast)] = [y] + list(torch.autograd.grad(y, (xx, rr), t["dy"].to(cast)))
    for i, name in enumerate(("y", "dx", "dresidual")):
        got, hi, lo = (out[k][i] for k in out)
        assert torch.isfinite(got).all(), name
        assert_close_to_ref(got, hi, lo, name=name)


def test_all_zero_fp16_rows_return_bias_like_torch(poison):
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(3, 256, dtype=torch.float16)
    x[1] = torch.randn(256, generator=g).half()  # one ordinary row between zero rows
    w = torch.randn(256, generator=g)
    b = torch.randn(256, generator=g)
    leaves = [t.to(DEV).requires_grad_() for t in (x, w, b)]
    y = layer_norm(*leaves, eps=1e-12, backend="triton").cpu()
    assert torch.equal(y[0], b.half()) and torch.equal(y[2], b.half())
    dy = torch.randn(3, 256, generator=g).half()
    grads = [g.cpu() for g in torch.autograd.grad(y, leaves, dy.to(DEV))]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(ref_leaves[0], (256,), ref_leaves[1], ref_leaves[2], eps=1e-12)
    torch.testing.assert_close(y, ref)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    # rstd = 1e6 on the zero rows: torch's dx overflows fp16 to +-inf there, and so does ours.
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        assert not torch.isnan(got).any(), name
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].float(), want[finite].float(), rtol=2e-3, atol=1e-3)
        assert torch.equal(torch.sign(got[~finite]), torch.sign(want[~finite])), name


def test_param_gradients_are_deterministic():
    t = {k: v.to(DEV) for k, v in _inputs(300, 768, torch.float16, seed=4).items()}
    runs = []
    for _ in range(2):
        leaves = [t[k].clone().requires_grad_() for k in ("x", "weight", "bias", "residual", "x_bias")]
        torch.manual_seed(3)
        y = layer_norm(leaves[0], leaves[1], leaves[2], residual=leaves[3], x_bias=leaves[4], dropout_p=0.1,
                       backend="triton")
        runs.append(torch.autograd.grad(y, leaves, t["dy"]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@triton.jit
def _offsets_kernel(tile_ptr, out_ptr, hidden, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.load(tile_ptr)
    row_idx = tln._tile_rows(tile, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs = tln._offsets(row_idx, cols, hidden)
    tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + cols[None, :], offs)


def test_offsets_are_64_bit_past_2_31_elements():
    """The offset math the kernels use, for row tiles whose elements lie past 2**31 (and 2**32)."""
    block_m, block_n, hidden = 4, 8, 4096
    for tile in (2**31 // (block_m * hidden) + 1, (2**33 // hidden) // block_m, (2**31 - 1) // block_m - 1):
        out = torch.empty(block_m, block_n, dtype=torch.int64, device=DEV)
        _offsets_kernel[(1,)](torch.tensor([tile], dtype=torch.int32, device=DEV), out, hidden, BLOCK_M=block_m,
                              BLOCK_N=block_n)
        out = out.cpu()
        rows = torch.arange(block_m, dtype=torch.int64) + tile * block_m
        want = rows[:, None] * hidden + torch.arange(block_n)[None, :]
        assert torch.equal(out, want), tile
        assert want.max() > 2**31


@pytest.mark.gpu
def test_more_than_2_31_elements_on_gpu():
    hidden = 1024
    rows = 2**31 // hidden + 5
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16, generator=g)
    res = torch.randn(rows, hidden, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(hidden, device="cuda", requires_grad=True)
    xr = x.requires_grad_()
    y = layer_norm(xr, w, None, residual=res, backend="triton")
    tail = slice(rows - 7, rows)  # rows past element 2**31
    ref = F.layer_norm((x[tail] + res[tail]).float(), (hidden,), w.float().detach())
    torch.testing.assert_close(y[tail].float(), ref, atol=2e-2, rtol=1e-2)
    dy = torch.zeros_like(y)
    dy[tail] = 1.0
    (dx,) = torch.autograd.grad(y, (xr,), dy)
    assert torch.isfinite(dx[tail]).all() and dx[tail].abs().sum() > 0
    assert dx[: rows - 7].abs().max() == 0


def test_opcheck_and_compile():
    t = _inputs(3, 24, torch.float32, seed=1)
    x, w, b, res, xb = (t[k].to(DEV).requires_grad_() for k in ("x", "weight", "bias", "residual", "x_bias"))
    torch.library.opcheck(torch.ops.fastbert.layer_norm_fwd.default,
                          (x, w, b, res, xb, torch.tensor([3, 4], device=DEV), 1e-5, 0.2, "triton"))
    torch.library.opcheck(torch.ops.fastbert.layer_norm_fwd.default,
                          (x, None, None, None, None, None, 1e-12, 0.0, "triton"))
    f = lambda x, r: layer_norm(x, w, b, residual=r, x_bias=xb, backend="triton")  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, res), f(x, res))


def test_strided_and_expanded_parameters(poison):
    """Issue 12 item 2: ``layer_norm(x, torch.randn(64)[::2])`` was off by 5.66 and a stride-0
    weight / bias / x_bias gave NaN; the ops layer hands every backend contiguous vectors."""
    g = torch.Generator().manual_seed(12)
    t = {k: v.to(DEV) for k, v in _inputs(5, 64, torch.float32, seed=12).items()}
    bases = {"weight": torch.randn(128, generator=g), "bias": torch.randn(1, generator=g),
             "x_bias": torch.randn(1, generator=g)}
    views = {"weight": lambda b: b[::2], "bias": lambda b: b.expand(64), "x_bias": lambda b: b.expand(64)}
    out = []
    for backend, cast in (("triton", torch.float32), ("reference", torch.float64), ("reference", torch.float32)):
        leaves = {k: b.to(DEV, cast).requires_grad_() for k, b in bases.items()}
        x = t["x"].to(cast).requires_grad_()
        v = {k: views[k](leaves[k]) for k in leaves}
        y = layer_norm(x, v["weight"], v["bias"], x_bias=v["x_bias"], backend=backend)
        out.append([y] + list(torch.autograd.grad(y, [x, *leaves.values()], t["dy"].to(cast))))
    for name, got, hi, lo in zip(("y", "dx", "dweight", "dbias", "dx_bias"), *out):
        # d(x_bias) of a stride-0 x_bias sums all 5 x 64 entries of dx, which cancel exactly (each row
        # of an LN gradient sums to 0): its floor grows with sqrt(terms), as rounding noise does.
        floor_eps = 4.0 * (5 * 64) ** 0.5 if name == "dx_bias" else 4.0
        assert_close_to_ref(got.cpu(), hi.cpu(), lo.cpu(), name=name, floor_eps=floor_eps)
