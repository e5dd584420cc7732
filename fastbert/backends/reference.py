"""Reference implementations: plain PyTorch that reads like the math; the arbiter of every parity test.

Built for clarity and fp64, not speed. Attention computes in fp32 (fp64 for fp64 inputs) whatever
the inputs' dtypes, rounding to the inputs' dtype only where the contract does (P before P @ V;
tests upcast the inputs to get the fp64 arbiter); LayerNorm and GELU compute in fp32 (fp64 for
fp64 input).
Backward formulas are written out (custom-op implementations run below autograd) and are checked
against torch autograd of independent implementations in the tests.

Sources: scaled dot-product attention, Vaswani et al. 2017, eq. (1); LayerNorm, Ba et al. 2016,
eqs. (3)-(4); GELU, Hendrycks & Gimpel 2016, sec. 2 (exact ``x * Phi(x)`` and its tanh form).

The functions live in ``fastbert.backends._composite`` (the torch backend shares them as its
fallback); this module is the reference backend's name for them.
"""

from __future__ import annotations

from fastbert.backends._composite import (  # noqa: F401  (the backend's entry points and math)
    window_mask, attention_math, attention_varlen_math, attention_fwd, attention_math_bwd,
    attention_varlen_math_bwd, attention_bwd, add_dropout_residual, layer_norm_math, layer_norm_fwd,
    layer_norm_dh, layer_norm_bwd, gelu_math, gelu_fwd, gelu_grad_math, gelu_bwd, geglu_fwd,
    geglu_bwd, rotate_half, rotate_pairs, rotary_math, rotary_fwd, rotary_bwd, acc_dtype,
    round_to,
)
