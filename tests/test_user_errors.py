"""Errors a user meets first: each names the argument, what was expected and what came
(found by a break-it pass over the public API)."""

from __future__ import annotations

import pytest
import torch

import fastbert.ops as ops


@pytest.mark.parametrize("call", [
    lambda t: ops.gelu(t), lambda t: ops.geglu(t), lambda t: ops.layer_norm(t, torch.ones(1), torch.zeros(1))],
    ids=["gelu", "geglu", "layer_norm"])
def test_zero_dim_input_reads_a_range_of_ndims(call):
    with pytest.raises(ValueError, match=r"^x: expected 1 to 8 dims, got 0 \(shape \(\)\)$"):
        call(torch.tensor(1.0))


def test_two_ndims_and_one_ndim_keep_their_wording():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^q: expected 3 or 4 dims, got 2"):
        ops.rotary(x, x, torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^bias: expected 1 dims, got 2"):
        ops.gelu(x, bias=x)


def test_bad_fastbert_backend_names_the_variable_and_the_valid_names(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "foo")
    with pytest.raises(ValueError, match=r"^FASTBERT_BACKEND \(environment variable\): expected one of "
                                         r"\[.*'reference'.*'torch'.*\] or 'auto', got 'foo'$"):
        ops.gelu(torch.randn(4, 8))
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    ops.gelu(torch.randn(4, 8))  # 'auto' is one of the valid names


@pytest.mark.parametrize("bad", ["foo", 3, ["torch"]])
def test_bad_backend_argument_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^backend: expected one of \[.*'torch'.*\] or 'auto', got " +
                       repr(bad).replace("[", r"\[").replace("]", r"\]") + "$"):
        ops.gelu(torch.randn(4, 8), backend=bad)
