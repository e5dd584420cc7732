"""Drop-in ``torch.nn`` modules backed by :mod:`fastbert.ops`, and ``swap_modules``.

:class:`LayerNorm` and :class:`GELU` subclass ``torch.nn.LayerNorm`` / ``torch.nn.GELU``: same
constructor arguments, parameters, ``state_dict`` keys and ``repr``; only ``forward`` changes. Every
fastbert module has a ``backend`` attribute (None = automatic dispatch) passed to each op call;
:func:`set_backend` sets it on a whole model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.ops import check_backend, gelu, layer_norm
from fastbert.ops.gelu import check_approximate


class OpsModule:
    """Mixin for modules that call fastbert ops: ``backend`` is passed to every op call.

    Setting ``backend`` validates the name (:func:`fastbert.ops.check_backend`: ValueError for a
    name no backend is registered under), so a typo fails where it is set, not at the first forward.
    """

    _backend: Optional[str] = None

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = check_backend(name)


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set ``backend`` (a backend name, or None for automatic) on every fastbert module in ``model``."""
    for m in model.modules():
        if isinstance(m, OpsModule):
            m.backend = backend
    return model


def _is_int(n) -> bool:
    """An int or a numpy integer (torch takes ``numbers.Integral``), not a bool."""
    return hasattr(type(n), "__index__") and not isinstance(n, bool) and not isinstance(n, torch.Tensor)


class LayerNorm(OpsModule, nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` over the last dimension (Ba et al. 2016, eqs. 3-4).

    Args: as ``torch.nn.LayerNorm`` (``normalized_shape``, ``eps=1e-5``, ``elementwise_affine=True``,
    ``bias=True``, ``device``, ``dtype``); plus keyword ``backend``. Input ``(..., hidden)`` with any
    number of leading dims, output the same shape and dtype (statistics in fp32).

    Raises:
        ValueError: ``normalized_shape`` has more than one dim (fastbert normalises the last dim
            only) or is negative, or the input's last dim differs from it.
        TypeError: ``normalized_shape`` is not an int or a 1-element tuple / list of one.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        shape = (normalized_shape,) if _is_int(normalized_shape) else (
            tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else None)  # torch.Size is a tuple
        if shape is None or not all(map(_is_int, shape)):
            raise TypeError(f"normalized_shape: expected an int or a 1-element shape (tuple, list, torch.Size) of "
                            f"an int, got {normalized_shape!r} of type {type(normalized_shape).__name__}")
        if len(shape) != 1:
            raise ValueError(f"normalized_shape: fastbert.nn.LayerNorm normalises the last dim only; expected "
                             f"an int or a 1-element shape, got {normalized_shape!r}")
        if shape[0].__index__() < 0:
            raise ValueError(f"normalized_shape: expected a size >= 0, got {normalized_shape!r}")
        shape = (shape[0].__index__(),)
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"x: expected last dim {self.normalized_shape[0]} (normalized_shape), "
                             f"got shape {tuple(x.shape)}")
        if x.dim() > 8:  # torch takes any number of leading dims; the op 1 to 8 (rows are independent)
            return layer_norm(x.reshape(-1, x.shape[-1]), self.weight, self.bias, eps=self.eps,
                              backend=self.backend).reshape(x.shape)
        return layer_norm(x, self.weight, self.bias, eps=self.eps, backend=self.backend)


class GELU(OpsModule, nn.GELU):
    """Drop-in for ``torch.nn.GELU(approximate="none" | "tanh")`` (Hendrycks & Gimpel 2016).

    Input any shape (as ``torch.nn.GELU``: a 0-d or 9+-d input runs flattened), output the same
    shape and dtype; computed in fp32.

    Raises:
        ValueError: ``approximate`` is not ``"none"`` or ``"tanh"`` (here, not at the first forward,
            where ``torch.nn.GELU`` would raise).
    """

    def __init__(self, approximate: str = "none", *, backend: Optional[str] = None):
        super().__init__(approximate=check_approximate(approximate))
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if not 1 <= x.dim() <= 8:  # torch.nn.GELU takes any shape; the op takes 1 to 8 dims (elementwise)
            return gelu(x.reshape(-1), approximate=self.approximate, backend=self.backend).reshape(x.shape)
        return gelu(x, approximate=self.approximate, backend=self.backend)


def swap_modules(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Replace every ``torch.nn.LayerNorm`` (1-D ``normalized_shape``) and ``torch.nn.GELU`` in
    ``model`` by fastbert's, in place, and return the model.

    The new modules hold the same ``Parameter`` objects (optimizers and ``state_dict`` are
    unaffected) and the same ``training`` flag; hooks registered on the old modules are not
    carried over. LayerNorms over several dims are left as they are. If ``model`` itself is a
    LayerNorm/GELU, the replacement is returned.
    """
    new = _replacement(model, backend)
    if new is not None:
        return new
    for name, child in list(model.named_children()):
        new = _replacement(child, backend)
        if new is not None:
            setattr(model, name, new)
        else:
            swap_modules(child, backend=backend)
    return model


def _replacement(m: nn.Module, backend: Optional[str]) -> Optional[nn.Module]:
    if isinstance(m, OpsModule):
        return None
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=False, backend=backend)
        new.elementwise_affine = m.elementwise_affine
        new.weight, new.bias = m.weight, m.bias  # the same Parameter objects (or None)
    elif type(m) is nn.GELU:
        new = GELU(m.approximate, backend=backend)
    else:
        return None
    new.train(m.training)
    return new


# Hugging Face ``hidden_act`` -> fastbert GELU form; anything else runs through torch.
GELU_ACTS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
             "gelu_fast": "tanh", "gelu_accurate": "tanh"}
TORCH_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "swish": F.silu, "mish": F.mish, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "linear": lambda x: x, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "leaky_relu": F.leaky_relu, "elu": F.elu, "selu": F.selu,
}


def resolve_activation(hidden_act: str) -> tuple[Optional[str], Optional[Callable[[Tensor], Tensor]]]:
    """``(approximate, None)`` for a GELU that fastbert.ops.gelu runs, else ``(None, torch_fn)``.

    Raises:
        ValueError: ``hidden_act`` names no known activation.
    """
    if hidden_act in GELU_ACTS:
        return GELU_ACTS[hidden_act], None
    if hidden_act in TORCH_ACTS:
        return None, TORCH_ACTS[hidden_act]
    raise ValueError(f"hidden_act: expected one of {sorted(GELU_ACTS) + sorted(TORCH_ACTS)}, got {hidden_act!r}")
