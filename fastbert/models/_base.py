"""What every fastbert model shares: the ``PreTrainedModel`` base (init, switches, loading checks)
and the base-model forward (embeddings -> the unpadded :class:`fastbert.nn.Encoder` -> pooler).

transformers owns configs, outputs, ``from_pretrained`` / ``save_pretrained``, tying and
resizing; fastbert owns the forward. fastbert-only options are constructor keywords that
``from_pretrained`` passes through (never config fields, so saved configs stay plain):

- ``unpad=True``: pack the real tokens once per call (zeros at padding positions of every
  per-token output); ``unpad=False`` runs padded with no host sync (``torch.compile(fullgraph=True)``).
- ``backend=None``: the op backend for every call (None = automatic); also a settable attribute.
- ``sparse_prediction=False`` (MLM / pre-training heads): see :mod:`fastbert.models.heads`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging

from fastbert.models._names import class_for
from fastbert.nn import Embeddings, set_backend
from fastbert.ops import check_backend, padding_mask, value_checks_enabled

logger = logging.get_logger(__name__)


def check_input_ids(input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], ndim: int = 2) -> None:
    """Exactly one of input_ids ``(batch, seqlen)`` integer / inputs_embeds ``(batch, seqlen, hidden)``
    (``ndim`` + 1 dims for multiple choice's ``(batch, num_choices, seqlen)``)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids, inputs_embeds: expected exactly one of them, got "
                         f"{'both' if input_ids is not None else 'neither'}")
    if input_ids is not None:
        if input_ids.dim() != ndim:
            raise ValueError(f"input_ids: expected {ndim} dims, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    elif inputs_embeds.dim() != ndim + 1:
        raise ValueError(f"inputs_embeds: expected {ndim + 1} dims, got shape {tuple(inputs_embeds.shape)}")


def embeds_without_padding(inputs_embeds: Optional[Tensor], attention_mask: Optional[Tensor],
                           packed: bool, indices: Optional[Tensor] = None) -> Optional[Tensor]:
    """``inputs_embeds`` with zeros at padding when the encoder runs packed (``packed``) and
    gradients are recorded; padding is where ``attention_mask`` is 0, or, without a mask, every
    position ``indices`` (the packed tokens' flat positions, checked before) leaves out.

    The packed encoder never reads padding rows, but the embeddings' LayerNorm runs on every
    position before packing, and its backward multiplies the padding rows' zero gradient by their
    values: a non-finite (or overflowing) padding embed made the LayerNorm weight, position and
    token-type gradients NaN. Without gradients nothing is zeroed (each row is normalised on its
    own: the real rows' outputs are the same bits either way). The padded mode keeps padding rows
    (it computes them as transformers does).
    """
    if inputs_embeds is None or not packed or not torch.is_grad_enabled():
        return inputs_embeds
    batch, seqlen = inputs_embeds.shape[:2]
    if attention_mask is not None:
        real = padding_mask(attention_mask, batch, seqlen, inputs_embeds.device)
    elif indices is not None:
        real = torch.zeros(batch * seqlen, dtype=torch.bool, device=inputs_embeds.device)
        real = real.index_fill_(0, indices.to(device=real.device, dtype=torch.long), True).view(batch, seqlen)
    else:
        return inputs_embeds
    return torch.where(real[..., None], inputs_embeds, 0)


def check_packing_metadata(attention_mask: Optional[Tensor], indices: Optional[Tensor],
                           cu_seqlens: Optional[Tensor], batch: int, seqlen: int) -> None:
    """Precomputed packing metadata must describe this batch (``unpad_metadata(attention_mask)``).

    Always: ``indices`` ``(total_tokens,)`` integer, ``cu_seqlens`` ``(batch + 1,)``. Where values
    are read (CPU tensors or ``FASTBERT_CHECK_INPUTS=1``; never while compiling, no host sync on
    CUDA): ``cu_seqlens`` non-decreasing from 0 to ``total_tokens``; ``indices`` strictly increasing
    flat positions ``b * seqlen + s`` with ``b`` the sequence ``cu_seqlens`` puts them in; with an
    ``attention_mask``, exactly its real tokens (else real tokens would attend to padding, silently).
    The attention op checks ``max_seqlen``. One of indices / cu_seqlens alone: the encoder's error.

    Raises:
        ValueError: the argument that disagrees, with the expected and the actual value.
    """
    if indices is None or cu_seqlens is None:
        return
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices: expected a 1-D integer tensor (total_tokens,), got shape "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens: expected shape (batch + 1,) = ({batch + 1},), got {tuple(cu_seqlens.shape)}")
    if not value_checks_enabled(indices, cu_seqlens, attention_mask):
        return
    total = indices.numel()
    cu = cu_seqlens.long()
    lengths = cu.diff()
    if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens: expected non-decreasing values from 0 to indices.numel() = {total}, "
                         f"got {_head(cu)}")
    real = None
    if attention_mask is not None:
        real = padding_mask(attention_mask, batch, seqlen, attention_mask.device)
        counts = real.sum(dim=-1).to(lengths.device)
        if int(counts.sum()) != total:
            raise ValueError(f"indices: expected attention_mask.sum() = {int(counts.sum())} real tokens, got "
                             f"{total} (metadata of another batch? pass unpad_metadata(attention_mask))")
        bad = torch.nonzero(counts != lengths).flatten()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(f"cu_seqlens: sequence {b} expected {int(counts[b])} tokens (attention_mask[{b}].sum()), "
                             f"got {int(lengths[b])}")
    if total == 0:
        return
    rows = torch.repeat_interleave(torch.arange(batch, device=indices.device), lengths.to(indices.device))
    if not (bool((torch.div(indices, seqlen, rounding_mode="floor") == rows).all())
            and bool((indices[1:] > indices[:-1]).all())):
        raise ValueError(f"indices: expected strictly increasing flat positions b * seqlen + s (seqlen = {seqlen}) "
                         f"in the rows cu_seqlens gives each sequence, got {_head(indices)}")
    if real is not None:
        pad = torch.nonzero(~real.flatten()[indices.to(real.device)]).flatten()
        if pad.numel():
            i = int(indices[int(pad[0])])
            raise ValueError(f"indices: expected the real tokens of attention_mask, got position {i} = "
                             f"(row {i // seqlen}, column {i % seqlen}), which attention_mask marks padding")


def _head(t: Tensor, n: int = 12) -> str:
    """``t``'s first values for an error message."""
    values = t[:n].tolist()
    return f"{values}{' ...' if t.numel() > n else ''}"


class FastbertPreTrainedModel(PreTrainedModel):
    """Base of every fastbert model: transformers' ``PreTrainedModel`` with fastbert's switches.

    Subclasses set ``config_class`` (their family's transformers config) and
    ``base_model_prefix``. ``_init_weights`` is transformers' (normal(0, initializer_range)
    Linear / Embedding weights, zero biases and padding rows, unit LayerNorm) plus: a bare
    ``bias`` Parameter of a head (the MLM decoder's) is zeroed, and the embeddings'
    non-persistent buffers are filled (transformers 5 builds models on the meta device).
    """

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"
    # fastbert runs its own attention whatever config._attn_implementation says; declaring every
    # implementation supported keeps transformers from refusing a config that names one.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, config: PreTrainedConfig, *args, **kwargs):
        want = self.config_class.model_type
        if getattr(config, "model_type", None) != want:
            raise TypeError(f"config: {type(self).__name__} expects a {self.config_class.__name__} "
                            f"(model_type {want!r}), got {type(config).__name__} (model_type "
                            f"{getattr(config, 'model_type', None)!r}); fastbert.models.AutoModel picks the class")
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Embeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1])[None])
            if hasattr(module, "token_type_ids"):
                init.zeros_(module.token_type_ids)
            if getattr(self.config, "sinusoidal_pos_embds", False):  # DistilBERT's option
                from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

                weight = module.position_embeddings.weight
                init.copy_(weight, create_sinusoidal_embeddings(weight.shape[0], weight.shape[1],
                                                                torch.empty_like(weight, device="cpu")))
        elif (isinstance(getattr(module, "bias", None), nn.Parameter)
              and not isinstance(module, (nn.Linear, nn.LayerNorm))):
            init.zeros_(module.bias)  # cls.predictions.bias / lm_head.bias

    # -- switches ---------------------------------------------------------------------------------

    @property
    def backend(self) -> Optional[str]:
        """The backend passed to every op call (None = automatic); setting it updates all modules."""
        return getattr(self, "_fastbert_backend", None)

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        check_backend(name)  # before any module changes: a bad name leaves the model as it was
        for m in self.modules():
            if isinstance(m, FastbertPreTrainedModel):
                m._fastbert_backend = name
        set_backend(self, name)

    @property
    def unpad(self) -> bool:
        """Run the encoder on packed real tokens (True) or padded (False); the base model's flag."""
        return self.base_model._unpad

    @unpad.setter
    def unpad(self, value: bool) -> None:
        self.base_model._unpad = bool(value)

    def _fastbert_init(self, backend: Optional[str]) -> None:
        """``post_init()`` then the backend switch (call last in every ``__init__``)."""
        self.post_init()
        self.backend = backend

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained`` (all its keyword arguments: ``num_labels``,
        ``problem_type``, ``id2label``, ``ignore_mismatched_sizes``, ``dtype`` / ``torch_dtype``,
        ``output_loading_info``, ...) plus fastbert's ``unpad``, ``backend``, ``sparse_prediction``
        and, for base models, ``add_pooling_layer``. ``attn_implementation`` is ignored (fastbert
        runs its own attention; logged).

        Raises:
            ValueError: the checkpoint's ``model_type`` is not this class's family (named, with
                the class to use).
            RuntimeError: encoder weights missing from the checkpoint (named; a new head or pooler
                is initialised and reported as transformers does).
        """
        if "attn_implementation" in kwargs:
            logger.info(f"attn_implementation={kwargs.pop('attn_implementation')!r} ignored: fastbert models "
                        "run fastbert.ops.attention")
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            config_dict, _ = PreTrainedConfig.get_config_dict(
                config if config is not None else pretrained_model_name_or_path,
                **{k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")
                   if k in kwargs})
            found = config_dict.get("model_type")
            if found != cls.config_class.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: checkpoint has model_type {found!r}, but "
                    f"{cls.__name__} is for {cls.config_class.model_type!r}; use "
                    f"{class_for(found, cls.__name__)} or fastbert.models.AutoModel")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              output_loading_info=True, **kwargs)
        # transformers initialises any missing weight and warns; a head or the pooler may be new,
        # but an encoder without its weights is a checkpoint that does not fit.
        prefix = cls.base_model_prefix + "."
        core = sorted(k for k in info["missing_keys"]
                      if k.removeprefix(prefix).startswith(("embeddings.", "encoder.", "transformer.",
                                                            "embeddings_project.", "layers.", "final_norm.")))
        if core:
            raise RuntimeError(f"{pretrained_model_name_or_path}: the checkpoint's keys do not fit {cls.__name__}: "
                               f"missing encoder weights {core[:8]}{' ...' if len(core) > 8 else ''} "
                               f"({len(core)} in all; unexpected: {sorted(info['unexpected_keys'])[:8]})")
        return (model, info) if want_info else model


class EncoderModelMixin:
    """The base-model forward shared by every family: embeddings -> (``embeddings_project``) ->
    the unpadded encoder -> (pooler). A family sets ``embeddings``, ``encoder_name``'s module (a
    :class:`fastbert.nn.Encoder`), optionally ``pooler`` and ``embeddings_project``."""

    encoder_name = "encoder"
    _unpad = True

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
               inputs_embeds=None, output_attentions=None, output_hidden_states=None, *, indices=None,
               cu_seqlens=None, max_seqlen=None):
        """Run the model; returns :class:`fastbert.nn.EncoderOutput` (heads read its ``packed``)."""
        check_input_ids(input_ids, inputs_embeds)
        check_packing_metadata(attention_mask, indices, cu_seqlens,
                               *(input_ids if input_ids is not None else inputs_embeds).shape[:2])
        inputs_embeds = embeds_without_padding(inputs_embeds, attention_mask, self._unpad or cu_seqlens is not None,
                                               indices)
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        project = getattr(self, "embeddings_project", None)
        if project is not None:  # ELECTRA: embedding_size != hidden_size
            x = project(x)
        cfg = self.config
        return getattr(self, self.encoder_name)(
            x, attention_mask, unpad=self._unpad, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=bool(cfg.output_attentions if output_attentions is None else output_attentions),
            output_hidden_states=bool(cfg.output_hidden_states if output_hidden_states is None
                                      else output_hidden_states))

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value


def return_dict_of(config, return_dict: Optional[bool]) -> bool:
    """``return_dict`` of a call, else the config's (transformers' rule)."""
    return getattr(config, "return_dict", True) if return_dict is None else return_dict


def base_output(config, enc, return_dict: Optional[bool], out_cls=BaseModelOutput, **fields):
    """A base model's output: ``out_cls`` of the encoder output ``enc`` (last_hidden_state,
    hidden_states, attentions; ``fields``: BERT's pooler_output), or its non-None fields as a tuple
    when ``return_dict`` (else the config's) is False."""
    out = out_cls(last_hidden_state=enc.last_hidden_state, hidden_states=enc.hidden_states,
                  attentions=enc.attentions, **fields)
    return out if return_dict_of(config, return_dict) else out.to_tuple()
