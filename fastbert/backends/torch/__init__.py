"""The torch composite backend: ``scaled_dot_product_attention``, ``native_layer_norm``, GELU math.

The fast default on CPU and the fallback everywhere. Varlen attention runs one sequence at a time
on CPU (no padding at all; reading ``cu_seqlens`` is a free host sync there) and is re-padded only
inside attention elsewhere. The contract's entry points write the preallocated outputs; the
``_functional`` twins below return aten's own results, saving the copies. With dropout, attention needs the shared
Philox keep mask, which SDPA cannot take, so it runs composite math instead: varlen on the CPU a
streamlined form per run of equal-length sequences (``_attention_dropout.py``: fewer passes, the
forward's softmax kept for the backward), elsewhere the reference's composite and its backward. ``lse`` is written only where ``fastbert.ops`` asks for it
(:func:`writes_lse_for`: padded CPU attention without dropout or bias, on the eager path): aten's
CPU flash attention, whose logsumexp lets backward run aten's flash backward without recomputing
the forward.

Padded attention with a mask (no bias, no dropout) runs aten's CPU flash attention on groups of
consecutive sequences, each on the keys up to its last valid one rounded up to 16 (other key
counts run 15-40% slower), one group for the batch where splitting saves less than assembling the
outputs costs (``_masked.py``'s cost model, cheaper without a backward), the masked keys inside a
span excluded by an additive ``-inf`` mask after a check that their K and V rows are finite; where
one is not, each sequence runs on its exact valid keys (masked keys never meet a product, whatever
they hold). The mask-derived plan is remembered per mask values (a BERT forward's layers share
one); the K/V check runs on every call. An all-ones mask is the unmasked call.
With a bias the padded path reads a broadcast ``attn_bias`` in its compact shape (SDPA broadcasts
it in place: no ``[B, H, Lq, Lk]`` temporaries).

Known difference from the reference: PyTorch's CPU ``scaled_dot_product_attention`` returns 0 for
a query row containing NaN (the reference propagates NaN); non-finite ``softmax_scale`` is
rejected by ``fastbert.ops`` for every backend.

Functional twins (``layer_norm_fwd/bwd_functional``, ``gelu_fwd/bwd_functional``,
``attention_fwd/bwd_functional`` for padded calls without bias) return fresh outputs instead of writing
preallocated ones; ``fastbert.ops`` prefers them where a module has them (aten's functional calls
allocate exactly what they return: no out= buffers, no copies; at 16 x 768 the ``out=`` call of
``native_layer_norm`` cost about twice the functional one). Their outputs are not poisoned by the
test switch; they have no element left to forget (masked attention assembled from several calls
allocates through ``fastbert.backends.workspace``, which is). ``gelu_fwd_differentiable`` / ``geglu_fwd_differentiable``
/ ``layer_norm_fwd_differentiable`` (fp32/fp64; None otherwise; see ``fastbert.backends``) and
``attention_fwd_differentiable`` (padded fp32/fp16/bf16 without bias or dropout, unmasked or a mask
planned as one flash call; None otherwise) compute the forward with differentiable aten calls:
``fastbert.ops``' eager path with gradients records aten's own graph through them (the plain torch
sequence's, no Python autograd node).

Layout: one module per op (``attention.py``, with ``_window.py`` for the local window and
``_masked.py`` for the key-mask plan; ``layer_norm.py``; ``gelu.py`` for GELU and GeGLU; ``rotary.py``); this package exports each op's
backend entry points, which ``fastbert.backends`` looks up by name.
"""

from fastbert.backends.torch.attention import (attention_bwd, attention_bwd_functional, attention_fwd,
                                              attention_fwd_differentiable, attention_fwd_functional,
                                              writes_lse_for)
from fastbert.backends.torch.gelu import (geglu_bwd, geglu_fwd, geglu_fwd_differentiable, geglu_saves_activation,
                                         gelu_bwd, gelu_bwd_functional, gelu_fwd, gelu_fwd_differentiable,
                                         gelu_fwd_functional)
from fastbert.backends.torch.layer_norm import (layer_norm_bwd, layer_norm_bwd_functional, layer_norm_fwd,
                                              layer_norm_fwd_differentiable, layer_norm_fwd_functional)
from fastbert.backends.torch.rotary import rotary_bwd, rotary_fwd

__all__ = ["attention_fwd", "attention_bwd", "attention_fwd_functional", "attention_bwd_functional",
           "attention_fwd_differentiable",
           "writes_lse_for", "layer_norm_fwd", "layer_norm_bwd", "layer_norm_fwd_functional",
           "layer_norm_bwd_functional", "layer_norm_fwd_differentiable", "gelu_fwd", "gelu_bwd",
           "gelu_fwd_functional", "gelu_bwd_functional", "gelu_fwd_differentiable", "geglu_fwd", "geglu_bwd",
           "geglu_fwd_differentiable", "geglu_saves_activation",
           "rotary_fwd", "rotary_bwd"]
