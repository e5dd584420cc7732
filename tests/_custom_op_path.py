"""The two paths of a ``fastbert.ops`` call that the thin-ops tests compare: plain eager (each op's
implementation through one autograd.Function, or aten's own graph where the backend declares a
differentiable forward: the torch backend's fp32/fp64 GELU and GeGLU) and traced (through the registered custom op, what
``torch.compile`` sees), here forced by a torch-function mode that changes nothing else."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode


class Passthrough(TorchFunctionMode):
    """Changes nothing but sends every op through its registered custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def output_and_grads(fn: Callable, inputs, dy_of: Callable, traced: bool, create_graph: bool = False) -> list:
    """``[y, *grads]`` of ``y = fn(*leaves)`` on fresh leaf copies of ``inputs``, through the custom-op
    path (``traced``) or the eager one, with output gradient ``dy_of(y)``."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with Passthrough() if traced else contextlib.nullcontext():
        y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy_of(y), create_graph=create_graph)]
