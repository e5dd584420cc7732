"""What a benchmark is: a case (one op, direction and size) with the implementations to time.

A :class:`Case` holds the work formula, a reference and a list of :class:`Impl`; an impl's
``prepare()`` builds its inputs (or model) and returns a :class:`Prepared` whose ``run`` is the
timed call and whose ``result()`` is checked against the reference once before timing. The runner
(``fastbert.bench.runner``) and the pytest-benchmark files in ``benchmarks/`` both consume these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch

from fastbert.bench.formulas import Work
from fastbert.env import emulated_reason, explain_reason, nvidia_driver_found

# Machine epsilon per dtype for the tolerance floor. fp64 (the test suite's runs; the benchmarks
# never time fp64) checks the math, not rounding: threaded reductions reorder sums by a few hundred ulps.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-44}


def tolerance(torch_err: float, mag: float, dtype: torch.dtype, factor: float, floor_eps: float) -> float:
    """STYLE.md's tolerance rule, the one source for the benchmarks' check and the test suite:
    ``max(factor * torch_err, floor_eps * eps(dtype) * max(1, mag))``, where ``torch_err`` is
    PyTorch's own error in ``dtype`` against the high-precision reference and ``mag`` the magnitude
    the floor scales with (the reference's, or that of the terms that cancel in it)."""
    return max(factor * torch_err, floor_eps * EPS[dtype] * max(1.0, mag))


@dataclass(frozen=True)
class ModelShape:
    """The BERT shape a benchmark takes its sizes from."""

    name: str
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODEL_SHAPES = {
    "base": ModelShape("base", 768, 12, 3072, 12),  # BERT-base (Devlin et al. 2019)
    "large": ModelShape("large", 1024, 16, 4096, 24),  # BERT-large
}


@dataclass
class Options:
    """What to run; filled from the command line by ``fastbert.bench.runner.parse_args``."""

    ops: tuple[str, ...] = ("attention", "layer_norm", "gelu", "encoder")
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    quick: bool = False
    models: tuple[str, ...] = ("base",)
    fill: float = 0.5
    backends: Optional[tuple[str, ...]] = None  # fastbert backends to time (None = all available)
    compile: bool = True  # torch.compile competitors
    directions: tuple[str, ...] = ("fwd", "bwd")  # ops; the encoder has "infer" and "train"
    encoder_modes: tuple[str, ...] = ("infer", "train")
    seqlens: Optional[tuple[int, ...]] = None
    batch: Optional[int] = None
    layers: Optional[int] = None
    rows: Optional[tuple[int, ...]] = None
    cuda_graphs: bool = True
    seed: int = 0


@dataclass
class Prepared:
    """A ready-to-time implementation: ``run()`` is timed; ``result()`` is checked once."""

    run: Callable[[], object]
    result: Callable[[], object]
    info: dict = field(default_factory=dict)  # e.g. {"sdpa_backend": "FLASH_ATTENTION"}


class RowInputs:
    """The inputs of a memory-bound case, ``rows`` x ``hidden`` in ``dtype`` on ``device``, drawn from
    ``seed`` on first use: a subclass gives ``draw(g)`` (CPU fp32 tensors from the generator ``g``)
    and ``reference(direction, dtype, composite)``."""

    def __init__(self, rows, hidden, dtype, device, seed):
        self.rows, self.hidden, self.dtype, self.device, self.seed = rows, hidden, dtype, device, seed

    @cached_property
    def tensors(self) -> list:
        return [t.to(self.device, self.dtype) for t in self.draw(torch.Generator().manual_seed(self.seed))]


def prepare_timed(fwd: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor,
                  direction: str, select: Callable = lambda t: t) -> Prepared:
    """A :class:`Prepared` for ``fwd()`` (direction "fwd") or its backward through ``leaves`` (which
    require grad for "bwd"): the backward of one recorded forward, replayed, gradients reset first.

    ``select`` maps each checked tensor to the layout the case's reference uses.
    """
    if direction == "fwd":  # the inputs do not require grad: no autograd graph is recorded
        return Prepared(run=fwd, result=lambda: select(fwd()))
    out = fwd()

    def run():
        for t in leaves:
            t.grad = None
        out.backward(dout, retain_graph=True)

    def result():
        run()
        return tuple(select(t.grad) for t in leaves)

    return Prepared(run=run, result=result)


@dataclass
class Impl:
    """One implementation of a case: a fastbert backend or a competitor.

    ``skip`` is the reason it is not timed (unavailable, interpreted, refused by capability).
    """

    name: str
    kind: str  # "fastbert" | "competitor"
    prepare: Optional[Callable[[], Prepared]] = None
    skip: Optional[str] = None
    default: bool = False  # the fastbert implementation the competitors' ratios refer to


@dataclass
class Case:
    """One op, direction and size, with its work formula, reference and implementations.

    ``reference()`` returns ``(hi, lo)``: the reference result in high precision (fp64 on the
    CPU, fp32 on the GPU) and in the benchmark dtype; an impl passes the check when, for every
    result tensor, ``max|result - hi| <= max(factor * max|lo - hi|, floor_eps * eps(dtype) *
    max(1, mag))`` (the tolerance rule of tests/_tolerance.py, see :func:`check_result`), where
    ``mag`` is ``floor_mags(hi)[i]`` when given (the magnitude of the terms that cancel in that
    tensor) and ``max|hi|`` otherwise. ``x`` places the case on the plot's x axis, labelled
    ``x_name``; ``x_tick`` (e.g. ``"4x128"``) labels the point when more than ``x`` changes.
    """

    op: str
    direction: str
    label: str
    params: dict
    x: float  # the plot's x value
    x_name: str
    dtype: torch.dtype
    device: str
    work: Work
    reference: Callable[[], tuple]
    impls: list[Impl]
    check_factor: float = 2.0
    floor_eps: float = 8.0
    floor_mags: Optional[Callable[[object], list]] = None  # hi reference -> magnitude per tensor
    x_tick: str = ""
    notes: list[str] = field(default_factory=list)

    def check(self, result, ref) -> dict:
        """:func:`check_result` of ``result`` against ``ref = self.reference()`` with this case's rule."""
        mags = self.floor_mags(ref[0]) if self.floor_mags is not None else None
        return check_result(result, ref[0], ref[1], self.dtype, self.check_factor, self.floor_eps, mags)


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _flat(item)]


def check_result(result, hi, lo, dtype: torch.dtype, factor: float, floor_eps: float,
                 floor_mags: Optional[Sequence[float]] = None) -> dict:
    """Compare ``result`` with the reference, tensor by tensor (tuples are compared pairwise).

    Tensor ``i`` passes when ``err_i = max|result_i - hi_i|`` is at most ``tol_i = max(factor *
    torch_err_i, floor_eps * eps(dtype) * max(1, mag_i))``: ``torch_err_i = max|lo_i - hi_i|`` is
    PyTorch's own error in ``dtype`` (the reference run in it), ``mag_i`` is ``floor_mags[i]``
    (the magnitude of the terms that cancel in it) or else ``max|hi_i|``. The floor matters where
    the reference is exact by construction: e.g. attention's dq of a one-token sequence is 0, the
    reference's softmax backward cancels it exactly, while FlashAttention's backward keeps a few
    ulp of ``rowsum(dO * O)`` there (see ``fastbert.bench.attention``).

    Returns ``{"ok", "max_abs_err", "tol", "torch_err", "worst"}`` for the tensor closest to (or
    furthest over) its tolerance, ``worst`` being its index; NaN anywhere fails.
    """
    out, ref_hi, ref_lo = _flat(result), _flat(hi), _flat(lo)
    if len(out) != len(ref_hi):
        return {"ok": False, "max_abs_err": None, "tol": None, "torch_err": None,
                "error": f"expected {len(ref_hi)} result tensors, got {len(out)}"}
    per_tensor = []  # (err / tol, record) per non-empty tensor
    for i, (o, r, lw) in enumerate(zip(out, ref_hi, ref_lo)):
        if tuple(o.shape) != tuple(r.shape):
            return {"ok": False, "max_abs_err": None, "tol": None, "torch_err": None,
                    "error": f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"}
        if o.numel() == 0:
            continue
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        err = (o64 - r64).abs().max().item()
        base = (lw.detach().double().cpu() - r64).abs().max().item()
        mag = floor_mags[i] if floor_mags is not None else r64.abs().max().item()
        tol = tolerance(base, mag, dtype, factor, floor_eps)
        ok = err <= tol and not torch.isnan(o64).any().item()  # a NaN error compares False
        per_tensor.append((err / tol if ok else float("inf"),
                           {"ok": ok, "max_abs_err": err, "tol": tol, "torch_err": base, "worst": i}))
    if not per_tensor:
        return {"ok": True, "max_abs_err": 0.0, "tol": 0.0, "torch_err": 0.0, "worst": None}
    worst = max(per_tensor, key=lambda t: t[0])[1]
    return dict(worst, ok=all(rec["ok"] for _, rec in per_tensor))


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def variable_lengths(batch: int, seqlen: int, fill: float, seed: int = 0) -> list[int]:
    """Realistic variable lengths with mean ``fill * seqlen`` (the longest at ``seqlen`` for fill >= 0.5).

    Lengths spread evenly over ``[(2 fill - 1) seqlen, seqlen]`` when fill >= 0.5, over
    ``[1, 2 fill seqlen]`` below (a stratified uniform sample, so even a small batch has the
    requested fill), in an order shuffled by ``seed``. A batch of one gets ``fill * seqlen``.
    """
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill: expected 0 < fill <= 1, got {fill}")
    if batch == 1:
        return [max(1, round(fill * seqlen))]
    lo, hi = (max(1, round((2 * fill - 1) * seqlen)), seqlen) if fill >= 0.5 else (1, max(1, round(2 * fill * seqlen)))
    lengths = [round(lo + (hi - lo) * i / (batch - 1)) for i in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[i] for i in order]


def cu_seqlens_of(lengths: Sequence[int], device) -> torch.Tensor:
    """``(batch + 1,)`` int32 cumulative sequence lengths."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    return cu.to(device)


def padding_mask(lengths: Sequence[int], seqlen: int, device) -> torch.Tensor:
    """bool ``(batch, seqlen)``: True at real tokens (BERT's convention, 1 = attend)."""
    return torch.arange(seqlen)[None, :] < torch.tensor(list(lengths))[:, None]


# ------------------------------------------------------------------------------------------------
# fastbert backends and competitors
# ------------------------------------------------------------------------------------------------


def emulated_skip(name: str, device: str) -> Optional[str]:
    """Why fastbert backend ``name`` is not timed on ``device`` because it runs emulated, or None."""
    reason = emulated_reason(name, device)
    return f"{reason}; an emulation is never timed" if reason else None


def fastbert_backends(call, opts: Options) -> list[tuple[str, Optional[str], bool]]:
    """``(name, skip_reason, is_default)`` for every registered fastbert backend to list for ``call``.

    The reference backend is listed only when asked for (``--backend reference``): the eager
    composite competitor is the same math without dispatch. The default is the backend automatic
    dispatch picks for ``call``.
    """
    from fastbert.backends import all_backends
    from fastbert.ops import resolve

    try:
        default = resolve(call, "auto")
    except RuntimeError:
        default = None
    out = []
    for name, spec in all_backends().items():
        if opts.backends is not None and name not in opts.backends:
            continue
        if opts.backends is None and name == "reference":
            continue
        reason = emulated_skip(name, call.device)
        if reason is None:
            reasons = dict.fromkeys(explain_reason(r, nvidia_driver_found()) for r in spec.reasons(call))
            reason = "; ".join(reasons) if reasons else None
        out.append((name, reason, name == default))
    if not any(d and r is None for _, r, d in out):  # auto's pick is not listed: take the first runnable
        for i, (name, reason, _) in enumerate(out):
            if reason is None:
                out[i] = (name, None, True)
                break
    return out


def sdpa_backend_name(q, k, v, attn_mask) -> str:
    """Which SDPA kernel torch picks for these ``[batch, heads, seqlen, head_dim]`` inputs."""
    try:
        from torch.nn.attention import SDPBackend

        choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False))
        names = {int(getattr(SDPBackend, n).value): n for n in dir(SDPBackend) if n.isupper()}
        return names.get(choice, str(choice))
    except Exception as exc:  # private API: fall back to the enabled flags
        flags = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")()
                 for n in ("flash", "mem_efficient", "math") if hasattr(torch.backends.cuda, f"{n}_sdp_enabled")}
        return f"unknown ({type(exc).__name__}); enabled: {flags}"


def optional_import(name: str):
    """``(module, None)`` or ``(None, reason)`` for an optional competitor."""
    try:
        import importlib

        return importlib.import_module(name), None
    except Exception as exc:
        return None, f"{name} is not importable ({type(exc).__name__}: {exc})"


def synchronize(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU) so wall-clock timings include it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def elementwise_impls(call, opts: Options, prepare: Callable, fastbert_fn: Callable,
                      eager_fn: Callable) -> list[Impl]:
    """The implementations of a memory-bound op case: fastbert on every listed backend, the eager
    composite and (unless ``--no-compile``/``--quick``) its ``torch.compile``.

    ``prepare(fn)`` builds the case's :class:`Prepared` for one callable; ``fastbert_fn(backend)``
    returns fastbert's callable for a backend.
    """
    impls = [Impl(f"fastbert[{name}]", "fastbert", skip=reason, default=default,
                  prepare=lambda n=name: prepare(fastbert_fn(n)))
             for name, reason, default in fastbert_backends(call, opts)]
    impls.append(Impl("torch-eager", "competitor", prepare=lambda: prepare(eager_fn)))
    impls.append(Impl("torch-compile", "competitor",
                      prepare=lambda: prepare(torch.compile(eager_fn, dynamic=False)),
                      skip=None if opts.compile else "torch.compile competitors are off (--quick or --no-compile)"))
    return impls


def row_sizes(opts: Options) -> tuple[int, ...]:
    """Row counts (tokens) to sweep for a memory-bound op."""
    if opts.rows:
        return opts.rows
    if opts.device != "cpu":
        return (8192, 65536) if opts.quick else (2048, 8192, 32768, 131072)
    return (256, 1024) if opts.quick else (1024, 4096, 16384)


def elementwise_cases(opts: Options, op: str, features: frozenset, width_of: Callable, inputs: type,
                      prepare: Callable, fastbert_fn: Callable, eager_fn: Callable, reference_fn: Callable,
                      work: Callable, params: dict) -> list[Case]:
    """Every case of a memory-bound op ``op`` (called with ``features``): ``opts``' model shapes
    (width ``width_of(shape)``) x :func:`row_sizes` x directions.

    ``inputs`` is the :class:`RowInputs` subclass of the op, whose ``reference(direction, dtype, fn)``
    runs ``fn`` (``reference_fn`` in fp64 on the CPU / fp32 on a GPU, and ``eager_fn`` in the case's
    dtype: the reference pair); ``prepare(inputs, fn, direction)`` builds a :class:`Prepared`;
    ``work(rows, width, dtype, direction)`` is the byte formula; ``params`` joins each case's
    ``model``, ``rows`` and ``hidden``.
    """
    from fastbert.backends import CallInfo

    out = []
    hi = torch.float32 if opts.device != "cpu" else torch.float64
    for model in opts.models:
        hidden = width_of(MODEL_SHAPES[model])
        for rows in row_sizes(opts):
            inp = inputs(rows, hidden, opts.dtype, opts.device, opts.seed)
            for direction in opts.directions:
                call = CallInfo(op, torch.device(opts.device).type, opts.dtype, None, features)
                impls = elementwise_impls(call, opts, lambda fn, d=direction, i=inp: prepare(i, fn, d),
                                          fastbert_fn, eager_fn)
                out.append(Case(
                    op=op, direction=direction, label=f"{model} rows{rows} hidden{hidden}",
                    params=dict(model=model, rows=rows, hidden=hidden, **params),
                    x=rows, x_name="rows (tokens)", dtype=opts.dtype, device=opts.device,
                    work=work(rows, hidden, opts.dtype, direction),
                    reference=lambda i=inp, d=direction: (i.reference(d, hi, reference_fn),
                                                          i.reference(d, i.dtype, eager_fn)),
                    impls=impls))
    return out
