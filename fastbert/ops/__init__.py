"""The functional API: ``attention``, ``layer_norm``, ``gelu``, ``geglu``, ``rotary``.

Validation, output allocation, dropout seeds, autograd and dispatch live here once; backends only
compute. Each op direction is a ``torch.library.custom_op`` (``fastbert::attention_fwd`` ...) with
a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it.
"""

from fastbert.backends import check_backend
from fastbert.ops._common import poisoned_outputs, set_poison_outputs, value_checks_enabled
from fastbert.ops._dispatch import fuses_dense_bias, resolve
from fastbert.ops.attention import attention, padding_mask
from fastbert.ops.geglu import geglu
from fastbert.ops.gelu import gelu
from fastbert.ops.layer_norm import layer_norm
from fastbert.ops.rotary import rotary

__all__ = ["attention", "layer_norm", "gelu", "geglu", "rotary", "padding_mask", "resolve", "check_backend", "fuses_dense_bias",
           "poisoned_outputs", "set_poison_outputs", "value_checks_enabled"]
