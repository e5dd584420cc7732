"""Compute backends and their registry.

Backends only compute. ``fastbert.ops`` validates inputs, allocates every output and workspace,
draws dropout seeds, handles autograd and picks the backend; a backend module exposes the same
forward and backward function per op it implements, each writing into preallocated outputs and
returning nothing:

``attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
dropout_p, seed, softmax_scale, allow_tf32, deterministic, window)``
    Padded: q ``[batch, seqlen_q, num_heads, head_dim]``, k/v ``[batch, seqlen_k, num_heads,
    head_dim]`` (any strides, contiguous last dim), ``out`` like q, ``lse`` ``[2, batch, num_heads,
    seqlen_q]`` fp32. Varlen: q/k/v/out ``[total_tokens, num_heads, head_dim]``, ``cu_seqlens``
    ``[batch + 1]`` int32 (contiguous), ``lse`` ``[2, num_heads, total_tokens]`` fp32. lse's two
    planes are the row max ``m`` and ``log(l)`` of the row sum (logsumexp = m + log l). ``attention_mask`` is None
    or bool ``[batch, seqlen_k]`` (True = attend). ``attn_bias`` is None or a 4-D view
    ``[batch, num_heads, seqlen_q, seqlen_k]`` (stride 0 on broadcast dims). ``seed`` is None
    (no dropout) or int64 ``[2]`` holding two uint32 words (see ``_philox``). Empty rows write
    ``out = 0`` and ``lse = (+inf, 0)``. A backend whose capabilities say ``writes_lse=False`` may leave
    ``lse`` untouched (it is then an empty tensor) and must not need it in backward.
    ``window`` is None (global attention) or a tuple ``(left, right)`` of two Python ints >= 0
    (already clamped to ``<= seqlen_q`` / ``<= seqlen_k``, ``<= max_seqlen`` in varlen): query row
    ``i`` sees key ``j`` only if ``i - left <= j <= i + right``, both indices within the sequence
    (padded: along seqlen_q / seqlen_k, top-left aligned also when they differ; varlen: offsets from
    the sequence's ``cu_seqlens`` start). Scores outside the window are replaced by ``-inf`` (the
    bias entries there have no influence; K and V rows stay finite, like a ``-inf`` bias's, since they
    are inside other rows' windows); a row left with no key is empty. The dropout
    mask keeps its counters (logical sequence, head, row, column): the global mask restricted to the
    window. A backend that implements it declares the ``"window"`` feature (and takes
    ``window=None`` as its default: the keyword is passed only when a window is set); calls with a
    window are refused by the others (it is not in :data:`ALL_FEATURES`).

``attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, <same keywords>)``
    Writes dq, dk, dv (like q, k, v) and, when ``dbias`` is not None, the full gradient of the
    scores bias as fp32 (fp64 for fp64 inputs) ``[batch, num_heads, seqlen_q, seqlen_k]``; ``fastbert.ops`` reduces it
    over the broadcast dims. With a ``window``, every dbias entry outside it is written 0.

``layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed)``
    x/residual/y/h ``[rows, hidden]`` (contiguous), weight/bias/x_bias ``[hidden]`` (contiguous;
    each x's dtype or fp32) or None.
    Computes ``h = dropout(x + x_bias) + residual`` (``h`` is None when nothing is fused; then
    h is x) and ``y = (h - mean) * rstd * weight + bias``; mean/rstd ``[rows]`` fp32 (fp64 for
    fp64 x).

``layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
seed)``
    dx/dresidual ``[rows, hidden]`` (dresidual may be None), dweight/dbias/dx_bias fp32 (fp64 for
    fp64) ``[hidden]`` or None, reduced deterministically.

``gelu_fwd(x, bias, y, *, approximate)`` / ``gelu_bwd(dy, x, bias, dx, dbias, *, approximate)``
    x/y/dx ``[rows, hidden]`` (contiguous), bias ``[hidden]`` (contiguous) or None, dbias fp32 (fp64 for fp64)
    ``[hidden]``.

``geglu_fwd(x, bias, y, *, approximate)`` / ``geglu_bwd(dy, x, bias, dx, dbias, *, approximate)``
    x/dx ``[rows, 2n]`` (contiguous), y/dy ``[rows, n]`` (contiguous), bias ``[2n]`` (contiguous) or
    None, dbias fp32 (fp64 for fp64) ``[2n]``. ``y = gelu(x[:, :n] + bias[:n]) * (x[:, n:] + bias[n:])``.

``rotary_fwd(q, k, cos, sin, q_out, k_out, *, positions, interleaved)`` /
``rotary_bwd(dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved)``
    q/k padded ``[batch, seqlen, heads, head_dim]`` or varlen ``[total_tokens, heads, head_dim]``
    (q and k may differ in heads; any strides, contiguous last dim), outputs like them
    (contiguous), or ``q_out is q`` and ``k_out is k`` (``inplace=True``: every backend must be
    in-place safe, in both directions; features past ``rotary_dim`` are then left alone). cos/sin ``[max_positions, rotary_dim / 2]`` (contiguous, fp32; fp64 for fp64 q),
    ``rotary_dim <= head_dim``. positions int64 ``[batch, seqlen]`` (stride 0 allowed) or
    ``[total_tokens]``: each token's row of the tables (the ops layer turns ``cu_seqlens`` into
    positions restarting per sequence). Features ``>= rotary_dim`` are copied. Backward is the
    inverse rotation (the forward with ``-sin``).

Optional entry points, looked up by name where a module has them (``fastbert.ops`` falls back to the
ones above otherwise):

``<op>_fwd_functional`` / ``<op>_bwd_functional`` (same arguments, no outputs)
    Return fresh outputs instead of writing preallocated ones (aten's functional calls allocate
    exactly what they return). ``layer_norm_fwd_functional`` returns ``(y, mean, rstd, h)`` and may
    leave a hint on ``rstd``: the Python float attribute ``_fastbert_worst_ratio``, the forward's
    ``max |mean| * rstd``, which the same backend's ``layer_norm_bwd*`` reads instead of measuring it
    again (autograd hands a saved tensor back as the same object; a tensor without it, as after a
    saved-tensor hook that copies, is measured again).

``<op>_fwd_differentiable`` (GELU, GeGLU, LayerNorm, attention)
    y through differentiable aten calls, or None where the backend computes the call another way.
    ``fastbert.ops``' eager path with gradients runs it under torch's autograd (aten's own backward
    nodes, no Python node: the plain torch sequence's graph); the result must equal the forward and
    backward entry points' bit for bit. ``layer_norm_fwd_differentiable(x, weight, bias, residual,
    x_bias, *, eps, backward)`` takes no dropout (ops keeps its own node there: it saves the seed,
    not a mask) and x with any leading dims; ``backward=False`` is the eager forward without
    gradients (y alone, none of the statistics). ``attention_fwd_differentiable(q, k, v, *,
    attention_mask, ..., backward)`` returns ``out`` alone (no ``lse``: aten's node keeps its own),
    None for calls it does not take; ``backward=False`` as for LayerNorm (it may then run plans
    whose backward it could not record).

A backend that needs scratch memory (row sums, partial reductions) asks :func:`workspace` for it:
the allocator is the one ``fastbert.ops`` uses for outputs, so the test switch that poisons every
output with NaN poisons workspaces too, and allocation policy stays in one place.

Each backend registers a :class:`BackendSpec` here. Its ``reasons(op, call)`` lists every reason
it cannot take a call (empty = it can); the dispatcher in ``fastbert.ops._dispatch`` walks them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

OPS = ("attention", "layer_norm", "gelu", "geglu", "rotary")


@dataclass(frozen=True)
class CallInfo:
    """What a backend needs to know to accept or refuse a call (metadata only, no values)."""

    op: str
    device: str  # "cpu" | "cuda" | ...
    dtype: torch.dtype
    head_dim: int | None = None
    features: frozenset = frozenset()  # e.g. {"attention_mask", "attn_bias", "attn_bias_grad",
    #                                     "varlen", "dropout", "deterministic", "tf32", "window",
    #                                     "interleaved"}


@dataclass
class OpCaps:
    """Declared capability of one backend for one op."""

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: Callable[[int], bool] | None = None  # None = any head_dim
    head_dims_doc: str = "any"
    features: frozenset = frozenset()  # supported features; unlisted ones are refused
    writes_lse: bool = True
    module: str | None = None  # compute module for this op when not the backend's own module


ALL_FEATURES = frozenset({"attention_mask", "attn_bias", "attn_bias_grad", "varlen", "dropout",
                          "deterministic", "tf32", "x_bias", "residual", "weight", "bias", "interleaved"})
# Features a backend declares on its own, not included in ALL_FEATURES (so a backend written against
# ALL_FEATURES refuses them until it implements them): attention's local ``window``.
WINDOW_FEATURE = "window"


@dataclass
class BackendSpec:
    """A registered backend: its capabilities, how to load it and whether auto dispatch may pick it."""

    name: str
    module: str | None  # import path of the compute module (or per op: ``OpCaps.module``)
    caps: dict[str, OpCaps]
    auto: tuple[str, ...] = ()  # ops for which auto dispatch may pick this backend
    probe: Callable[[], str | None] = lambda: None  # reason unavailable, or None (cheap)
    # Whether moving a dense layer's bias into this backend's LayerNorm / GELU op (``x_bias=``,
    # ``bias=``) pays. A kernel backend fuses the add into its single pass; the torch backend
    # (addmm adds the bias inside the GEMM for free) would spend an extra pass on it.
    fuses_dense_bias: bool = True
    _modules: dict = field(default_factory=dict, repr=False)  # path -> module or error string

    def _module_path(self, op: str | None) -> str | None:
        caps = self.caps.get(op) if op is not None else None
        return (caps.module if caps is not None and caps.module else None) or self.module

    def unavailable_reason(self, op: str | None = None) -> str | None:
        """Why this backend (for ``op``) cannot run in this process (None when it can)."""
        reason = self.probe()
        if reason is not None:
            return reason
        mod = self.load(op)
        return mod if isinstance(mod, str) else None

    def load(self, op: str | None = None) -> ModuleType | str:
        """Import the compute module (of ``op``) once; returns it, or the import error as a string."""
        path = self._module_path(op)
        if path is None:
            return f"no compute module declared for {op}"
        if path not in self._modules:
            try:
                self._modules[path] = importlib.import_module(path)
            except Exception as exc:  # a broken optional dependency must not break import fastbert
                self._modules[path] = f"import {path} failed: {type(exc).__name__}: {exc}"
        return self._modules[path]

    def reasons(self, call: CallInfo) -> list[str]:
        """Every reason this backend cannot take ``call``; empty when it can."""
        out: list[str] = []
        caps = self.caps.get(call.op)
        if caps is None:
            return [f"does not implement {call.op}"]
        reason = self.unavailable_reason(call.op)
        if reason is not None:
            return [reason]
        if call.device not in caps.devices:
            out.append(f"device {call.device!r} not in {caps.devices}")
        if call.dtype not in caps.dtypes:
            out.append(f"dtype {call.dtype} not in {[str(d) for d in caps.dtypes]}")
        if call.head_dim is not None and caps.head_dims is not None and not caps.head_dims(call.head_dim):
            out.append(f"head_dim {call.head_dim} not supported (supports {caps.head_dims_doc})")
        missing = sorted(call.features - caps.features)
        if missing:
            out.append(f"features not supported: {', '.join(missing)}")
        return out


class _Registry(dict):
    """The backends by name. Every change (``register_backend``, or a test writing the dict
    directly, as ``monkeypatch.setitem`` does) bumps ``version`` and empties the caches of
    remembered answers that were registered with :meth:`invalidates` (dispatch's resolved
    backends, loaded modules, dense-bias decisions): one hook, so no cache keys on the registered
    specs' identities or checks a version of its own."""

    version = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._caches: list = []

    def invalidates(self, cache: dict) -> dict:
        """Empty ``cache`` on every change of the registry from now on; returns it."""
        self._caches.append(cache)
        return cache

    def _changed(self):
        self.version += 1
        for cache in self._caches:
            cache.clear()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        try:
            return super().pop(*args)
        finally:
            self._changed()

    def popitem(self):
        try:
            return super().popitem()
        finally:
            self._changed()

    def clear(self):
        super().clear()
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        try:
            return super().setdefault(key, default)
        finally:
            self._changed()

    def __ior__(self, other):
        self.update(other)
        return self


_REGISTRY: _Registry[str, BackendSpec] = _Registry()
_workspace_allocator: Callable | None = None


def set_workspace_allocator(fn: Callable) -> None:
    """Install ``fn(shape, dtype, device) -> Tensor`` as the allocator of :func:`workspace`
    (``fastbert.ops`` installs its own at import)."""
    global _workspace_allocator
    _workspace_allocator = fn


def workspace(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Scratch memory for a backend from the ops layer's allocator (NaN-poisoned under the test
    switch, so a kernel that reads scratch it never wrote fails its parity tests)."""
    if _workspace_allocator is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return _workspace_allocator(shape, dtype, device)


def preload() -> None:
    """Import the compute module of every backend that can run here, once.

    Dispatch then never imports while ``torch.compile`` traces a first call (Dynamo cannot trace
    ``importlib``); a backend that cannot load keeps its reason.
    """
    for spec in _REGISTRY.values():
        for op in spec.caps:
            spec.unavailable_reason(op)


def register_backend(spec: BackendSpec) -> None:
    """Register (or replace) a backend by name."""
    _REGISTRY[spec.name] = spec


def get_backend(name: str, arg: str = "backend") -> BackendSpec:
    """The registered backend called ``name``; ValueError listing the known names otherwise, named
    ``arg`` (where the name came from: ``backend`` or the ``FASTBERT_BACKEND`` variable)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list)
        raise ValueError(f"{arg}: expected one of {sorted(_REGISTRY)} or 'auto', got {name!r}") from None


def check_backend(name, arg: str = "backend"):
    """Validate a ``backend=`` value where it is stored (a model's or module's constructor,
    ``patch()``), so a typo fails there and not at the first forward. Dispatch is unchanged: the
    name is still resolved per call (``FASTBERT_BACKEND`` is read then, not here).

    Returns ``name``: None or ``"auto"`` (automatic dispatch), or a registered backend's name.

    Raises:
        TypeError: ``name`` is neither None nor a str.
        ValueError: a str that names no registered backend (the error lists the names).
    """
    if name is None or name == "auto":
        return name
    if not isinstance(name, str):
        raise TypeError(f"{arg}: expected a backend name (str) or None, got {type(name).__name__} {name!r}")
    if name not in _REGISTRY:
        raise ValueError(f"{arg}: expected one of {sorted(_REGISTRY)}, 'auto' or None, got {name!r}")
    return name


def all_backends() -> dict[str, BackendSpec]:
    """All registered backends by name, in registration order."""
    return dict(_REGISTRY)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_ANY_DEVICE = ("cpu", "cuda")




def _with_window(op: str) -> frozenset:
    return ALL_FEATURES | {WINDOW_FEATURE} if op == "attention" else ALL_FEATURES


register_backend(BackendSpec(
    name="reference",
    module="fastbert.backends.reference",
    caps={op: OpCaps(devices=_ANY_DEVICE, dtypes=_FLOATS + (torch.float64,), features=_with_window(op))
          for op in OPS},
))
register_backend(BackendSpec(
    name="torch",
    module="fastbert.backends.torch",
    caps={op: OpCaps(devices=_ANY_DEVICE, dtypes=_FLOATS + (torch.float64,), features=_with_window(op),
                     writes_lse=False)
          for op in OPS},
    auto=OPS,
    fuses_dense_bias=False,
))


def _load_optional_backends() -> None:
    """Let the Triton and CUDA backends declare themselves (each file registers its own spec)."""
    for mod in ("fastbert.backends.triton", "fastbert.backends.cuda"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


_load_optional_backends()
