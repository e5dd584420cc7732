"""fastbert inside sentence-transformers models (bi-encoders and cross-encoders).

One line::

    from fastbert.integrations.sentence_transformers import patch
    model = patch(SentenceTransformer(path))        # or CrossEncoder(path)

patches, in place, every transformers model the sentence-transformers model holds (a
``SentenceTransformer``'s ``Transformer`` module, a ``CrossEncoder``'s classifier) with
:func:`fastbert.integrations.transformers.patch`: the encoder runs unpadded on the real tokens of
each padded batch sentence-transformers tokenizes, so ``encode`` / ``predict`` never pay for
padding (sentence-transformers' own flattening needs flash-attention, a GPU). Pooling,
normalisation and heads are unchanged. Needs neither sentence-transformers nor transformers at
import; duck-typed on ``torch.nn.Module``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastbert.integrations import transformers as _hf_integration


def _transformers_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``PreTrainedModel`` submodules of ``model`` (itself included)."""
    pretrained = _hf_integration._hf().PreTrainedModel
    if isinstance(model, pretrained):
        return [model]
    found = []
    for child in model.children():
        found += _transformers_models(child)
    return found


def patch(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Patch every transformers model inside a sentence-transformers model in place.

    Args:
        model: a ``SentenceTransformer``, ``CrossEncoder`` (or any module holding BERT-family
            transformers models).
        backend: as :func:`fastbert.integrations.transformers.patch`.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` holds no transformers model (or one that patch() rejects).
    """
    found = _transformers_models(model)
    if not found:
        raise ValueError(f"model: expected a sentence-transformers model holding a transformers model, "
                         f"found none in {type(model).__name__}")
    for m in found:
        _hf_integration.patch(m, backend=backend)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`. Returns ``model``."""
    for m in _transformers_models(model):
        _hf_integration.unpatch(m)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether every transformers model inside ``model`` is patched."""
    found = _transformers_models(model)
    return bool(found) and all(_hf_integration.is_patched(m) for m in found)


__all__ = ["patch", "unpatch", "is_patched"]
