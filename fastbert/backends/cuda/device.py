"""Compute module of the ``cuda`` backend: the backend contract bound to ``fastbert._C``.

Importing it raises ImportError (recorded by the registry as the reason) when the extension is
missing or was built for another fastbert version.
"""

from fastbert.backends.cuda import bind

_f = bind("_C")
attention_fwd, attention_bwd = _f["attention_fwd"], _f["attention_bwd"]
layer_norm_fwd, layer_norm_bwd = _f["layer_norm_fwd"], _f["layer_norm_bwd"]
gelu_fwd, gelu_bwd = _f["gelu_fwd"], _f["gelu_bwd"]
geglu_fwd, geglu_bwd = _f["geglu_fwd"], _f["geglu_bwd"]
rotary_fwd, rotary_bwd = _f["rotary_fwd"], _f["rotary_bwd"]
