"""Swap fastbert into existing models.

:mod:`fastbert.integrations.transformers` (needs ``transformers>=5,<6``, imported lazily):

- :func:`register` makes ``attn_implementation="fastbert"`` work in any Hugging Face model that
  uses transformers' ``AttentionInterface`` (BERT and its family);
- :func:`patch` rewires an existing BERT-family model in place: its encoder runs fastbert's
  unpadded fused encoder on the model's own parameters; :func:`unpatch` restores it.

:mod:`fastbert.integrations.sentence_transformers`: ``patch(SentenceTransformer(...))`` or
``patch(CrossEncoder(...))`` patches the transformers models inside.
"""

from __future__ import annotations

__all__ = ["register", "patch", "unpatch", "is_patched"]


def __getattr__(name):
    # transformers is an optional dependency: import it only when an integration is used.
    if name in __all__:
        from fastbert.integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module 'fastbert.integrations' has no attribute {name!r}")
