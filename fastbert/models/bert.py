"""BERT (Devlin et al. 2019) on fastbert ops, with Hugging Face's names, state_dict keys and outputs.

``BertModel`` runs unpadded by default: it packs the real tokens once per call
(:mod:`fastbert.nn.padding`), runs every layer on ``(total_tokens, hidden)`` with varlen attention,
and pads once at the end, writing zeros at padding positions. ``BertModel(config, unpad=False)``
(or ``model.unpad = False``) runs padded with ``attention_mask``; that mode has no host sync and
no data-dependent shapes, so it compiles with ``torch.compile(fullgraph=True)``. Compiled callers
of the unpadded mode compute ``indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)``
outside the compiled region and pass them to ``forward``.

``backend=`` (constructor argument or attribute; None = automatic) is passed to every op call.

Checkpoints: see :meth:`BertPreTrainedModel.load_hf_state_dict` for the table of accepted key
renames and ignorable keys; ``save_pretrained`` writes a directory that
``transformers.BertModel.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.nn import LayerNorm, OpsModule, resolve_activation, set_backend
from fastbert.nn.bert import BertLayer
from fastbert.nn.padding import index_first_axis, pad_input, unpad_metadata
from fastbert.ops import gelu, layer_norm, padding_mask, value_checks_enabled

# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class BertConfig:
    """BERT hyper-parameters with Hugging Face ``config.json`` names and defaults (BERT-base).

    ``hidden_act`` maps as follows: ``gelu``/``gelu_python`` -> exact erf GELU,
    ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast``/``gelu_accurate`` -> tanh GELU (both on
    fastbert.ops.gelu), others (``relu``, ``silu`` ...) run through torch. Special token ids come
    from the config (they differ between BERTs); ``pad_token_id`` is the word embedding's
    ``padding_idx``. Keys this class does not know are kept in ``extra`` and written back.

    Raises:
        NotImplementedError: ``position_embedding_type`` other than ``"absolute"``, ``is_decoder``
            or ``add_cross_attention`` (named in the message).
        ValueError: ``hidden_size`` not a multiple of ``num_attention_heads``, an unknown
            ``hidden_act`` or ``problem_type``.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    classifier_dropout: Optional[float] = None
    num_labels: int = 2
    problem_type: Optional[str] = None
    id2label: Optional[dict] = None
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(f"position_embedding_type: only 'absolute' is supported, got "
                                      f"{self.position_embedding_type!r}")
        if self.is_decoder:
            raise NotImplementedError("is_decoder: fastbert runs BERT encoders only, got is_decoder=True")
        if self.add_cross_attention:
            raise NotImplementedError("add_cross_attention: cross-attention is not supported, got True")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: expected a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.hidden_size}")
        resolve_activation(self.hidden_act)
        if self.problem_type is not None and self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type: expected one of {_PROBLEM_TYPES} or None, got {self.problem_type!r}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """From a Hugging Face config dict; unknown keys go to ``extra``."""
        d = dict(d)
        d.pop("extra", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if "id2label" not in kwargs and "num_labels" not in kwargs and "label2id" in d:
            kwargs["num_labels"] = len(d["label2id"])
        d.pop("label2id", None)
        return cls(**kwargs, extra=d)

    @classmethod
    def from_json_file(cls, path) -> "BertConfig":
        """From a ``config.json`` file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, path) -> "BertConfig":
        """From a checkpoint directory's ``config.json`` (or the file itself)."""
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def to_dict(self) -> dict:
        """A Hugging Face compatible config dict (``model_type: "bert"``, unknown keys kept)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        if self.id2label is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: k for k, v in self.id2label.items()}
            del d["num_labels"]
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = "bert"
        return out

    def to_json_file(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# ----------------------------------------------------------------------------------------------
# outputs: dataclasses with Hugging Face's field names, indexable like its ModelOutput
# ----------------------------------------------------------------------------------------------


class ModelOutput:
    """Indexable by field name or by position over the fields that are not None (as Hugging Face's)."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self.to_tuple())


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    """last_hidden_state ``(batch, seqlen, hidden)``; pooler_output ``(batch, hidden)``;
    hidden_states: embeddings + each layer's output, each ``(batch, seqlen, hidden)`` (zeros at
    padding in the unpadded mode);
    attentions: per layer ``(batch, num_heads, seqlen, seqlen)``; cross_attentions: always None."""

    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    """loss ``()``; prediction_logits ``(batch, seqlen, vocab_size)``; seq_relationship_logits ``(batch, 2)``."""

    loss: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None
    seq_relationship_logits: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    """loss ``()``; logits ``(batch, seqlen, vocab_size)``."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    """loss ``()``; logits ``(batch, num_labels)``."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# checkpoint key table
# ----------------------------------------------------------------------------------------------

# Renames applied to checkpoint keys (old TF-converted checkpoints name LayerNorm's parameters so).
KEY_RENAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
# Checkpoint keys dropped silently (suffix match): a persistent position-ids buffer of older
# transformers versions; ours computes positions on the fly.
IGNORED_KEY_SUFFIXES = ("embeddings.position_ids",)
# Keys of the MLM decoder tied to other parameters: never saved, accepted when loading.
TIED_KEYS = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"}
# Hugging Face BERT head modules (pre-training/MLM/NSP: cls; sequence/token classification and
# multiple choice: classifier; question answering: qa_outputs): ignored when a bare BertModel loads
# a checkpoint with a head.
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class BertEmbeddings(OpsModule, nn.Module):
    """``dropout(LayerNorm(word + position + token_type))``; the sum is fused into the LayerNorm.

    input_ids / token_type_ids / position_ids ``(batch, seqlen)`` int64, or inputs_embeds
    ``(batch, seqlen, hidden)``. position_ids default to ``0..seqlen-1``, token_type_ids to 0.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) -> Tensor:
        seqlen = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        if position_ids is None and seqlen > self.position_embeddings.num_embeddings:
            raise ValueError(f"input_ids: expected seqlen <= max_position_embeddings "
                             f"({self.position_embeddings.num_embeddings}), got {seqlen}")
        for name, ids, table in (("input_ids", input_ids, self.word_embeddings),
                                 ("token_type_ids", token_type_ids, self.token_type_embeddings),
                                 ("position_ids", position_ids, self.position_embeddings)):
            if ids is not None and ids.numel() and value_checks_enabled(ids):
                lo, hi = ids.min().item(), ids.max().item()
                if lo < 0 or hi >= table.num_embeddings:
                    raise ValueError(f"{name}: expected values in [0, {table.num_embeddings - 1}], "
                                     f"got values in [{lo}, {hi}]")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seqlen = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=device)[None, :]  # broadcast over batch
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch, seqlen), dtype=torch.long, device=device)
        rest = self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        x = layer_norm(inputs_embeds, self.LayerNorm.weight, self.LayerNorm.bias, eps=self.LayerNorm.eps,
                       residual=rest.expand_as(inputs_embeds).to(inputs_embeds.dtype), backend=self.backend)
        return F.dropout(x, self.dropout_p, self.training)  # after LayerNorm, as in BERT


class BertEncoder(nn.Module):
    """The stack of ``num_hidden_layers`` :class:`BertLayer` s (``encoder.layer.N`` keys); BertModel runs them."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's final hidden state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


_SKIP_INIT = False  # True while from_pretrained builds a model whose weights it then loads


class BertPreTrainedModel(nn.Module):
    """Shared init, backend/unpad switches, checkpoint loading and saving."""

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config: expected a fastbert.models.BertConfig, got {type(config).__name__}")
        self.config = config

    # -- switches ---------------------------------------------------------------------------------

    @property
    def backend(self) -> Optional[str]:
        """The backend passed to every op call (None = automatic); setting it updates all modules."""
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        for m in self.modules():
            if isinstance(m, BertPreTrainedModel):
                m._backend = name
        set_backend(self, name)

    def _init_weights(self, modules=None) -> None:
        """Hugging Face's BERT init: normal(0, initializer_range) weights, zero biases, unit LayerNorm
        (of ``modules``, default all); skipped inside ``from_pretrained``, which loads every weight."""
        if _SKIP_INIT:
            return
        modules = list(self.modules()) if modules is None else modules
        std = self.config.initializer_range
        for m in modules:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in modules:
            if isinstance(m, BertLMPredictionHead):
                nn.init.zeros_(m.bias)

    # -- checkpoints ------------------------------------------------------------------------------

    def _prefix(self) -> str:
        return "" if isinstance(self, BertModel) else self.base_model_prefix + "."

    def load_hf_state_dict(self, state_dict: dict) -> None:
        """Load a Hugging Face BERT state_dict strictly, relative to this table:

        - renamed: ``*.LayerNorm.gamma`` -> ``*.LayerNorm.weight``, ``*.LayerNorm.beta`` ->
          ``*.LayerNorm.bias`` (:data:`KEY_RENAMES`);
        - ignored: ``*embeddings.position_ids`` (a buffer older versions saved);
        - the encoder prefix ``bert.`` may be present or absent;
        - a bare :class:`BertModel` ignores head keys (``cls.*``, ``classifier.*``, ``qa_outputs.*``);
          a head model requires its own head's keys (to start fine-tuning from an encoder-only
          checkpoint, load it into ``model.bert``);
        - the tied MLM decoder keys ``cls.predictions.decoder.weight`` / ``.bias`` are optional
          (tied to the word embeddings / ``cls.predictions.bias``); when present they are dropped
          (the source of the tie is loaded) except ``decoder.bias`` standing in for a missing
          ``cls.predictions.bias``, and ``decoder.weight`` when ``tie_word_embeddings`` is False.

        Raises:
            RuntimeError: listing every missing and every unexpected key after the table.
        """
        prefix = self._prefix()
        heads = HEAD_PREFIXES + tuple(f"{name}." for name, _ in self.named_children() if name != "bert")
        tied = self._tied_keys()
        sd = {}
        for key, value in state_dict.items():
            for old, new in KEY_RENAMES.items():
                if key.endswith(old):
                    key = key[: -len(old)] + new
            if key.endswith(IGNORED_KEY_SUFFIXES):
                continue
            if prefix and not key.startswith((prefix,) + heads):
                key = prefix + key  # encoder keys of an encoder-only checkpoint
            elif not prefix and key.startswith(self.base_model_prefix + "."):
                key = key[len(self.base_model_prefix) + 1:]  # a head checkpoint loaded as BertModel
            if not prefix and key.startswith(HEAD_PREFIXES):
                continue
            sd[key] = value
        decoder_bias, head_bias = "cls.predictions.decoder.bias", "cls.predictions.bias"
        if decoder_bias in sd and head_bias not in sd and head_bias in tied.values():
            sd[head_bias] = sd[decoder_bias]  # a checkpoint that saved only the decoder's side of the tie
        for key in tied:
            sd.pop(key, None)
        expected = [k for k in self.state_dict() if k not in tied]
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in set(expected)]
        if missing or unexpected:
            raise RuntimeError(f"{type(self).__name__}: checkpoint keys do not match (after the renames and "
                               f"ignorable keys of load_hf_state_dict):\n  missing: {missing}\n"
                               f"  unexpected: {unexpected}")
        for key, source in tied.items():
            sd[key] = sd[source]
        self.load_state_dict(sd, strict=True)

    def _tied_keys(self) -> dict:
        """Keys of this model tied to another key (not saved, optional when loading)."""
        if not hasattr(self, "cls") or not hasattr(self.cls, "predictions"):
            return {}
        tied = dict(TIED_KEYS)
        if not self.config.tie_word_embeddings:
            del tied["cls.predictions.decoder.weight"]
        return tied

    @classmethod
    def from_pretrained(cls, path, *, unpad: bool = True, backend: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, device=None):
        """Load a Hugging Face BERT directory: ``config.json`` + ``model.safetensors`` (or
        ``pytorch_model.bin``), strictly per :meth:`load_hf_state_dict`'s table.

        Raises:
            FileNotFoundError: no config.json or weights file in ``path``.
            RuntimeError: missing / unexpected keys (listed).
        """
        path = os.fspath(path)
        config = BertConfig.from_pretrained(path)
        global _SKIP_INIT
        _SKIP_INIT = True
        try:
            model = cls(config, unpad=unpad, backend=backend)
        finally:
            _SKIP_INIT = False
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.exists(st):
            from safetensors.torch import load_file

            state_dict = load_file(st)
        elif os.path.exists(pt):
            state_dict = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"path: no model.safetensors or pytorch_model.bin in {path!r}")
        model.load_hf_state_dict(state_dict)
        model.eval()
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (metadata ``{"format": "pt"}``), without
        the tied decoder keys; ``transformers.BertModel.from_pretrained(path)`` loads it."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        tied = self._tied_keys()
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings -> N layers -> pooler (Devlin et al. 2019).

    Args:
        config: :class:`BertConfig`.
        add_pooling_layer: build the pooler (``pooler_output`` is None without it).
        unpad: run on packed real tokens (default) or padded with ``attention_mask``.
        backend: op backend for every call (None = automatic).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, *, unpad: bool = True,
                 backend: Optional[str] = None):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.unpad = unpad
        self._init_weights()
        self.backend = backend

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, *,
                indices: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None):
        """Encode a padded batch.

        Args (Hugging Face's names and defaults):
            input_ids: ``(batch, seqlen)`` int64 token ids; or ``inputs_embeds``
                ``(batch, seqlen, hidden)`` (exactly one of the two).
            attention_mask: ``(batch, seqlen)``, 1 / True = real token, 0 = padding; None = all real.
            token_type_ids: ``(batch, seqlen)`` segment ids (default 0).
            position_ids: ``(batch, seqlen)`` or ``(1, seqlen)`` (default ``0..seqlen-1``).
            output_attentions: also return per-layer attention probabilities (computed by a
                separate plain-torch pass; before dropout).
            output_hidden_states: also return the embeddings and every layer's output.
            return_dict: a :class:`BaseModelOutputWithPoolingAndCrossAttentions` (default) or a tuple.
            indices, cu_seqlens, max_seqlen: precomputed ``unpad_metadata(attention_mask)`` for the
                unpadded mode (``indices`` ``(total_tokens,)`` int64, ``cu_seqlens`` ``(batch + 1,)``
                int32, ``max_seqlen`` int), so a compiled caller avoids the host sync; they take
                precedence over ``attention_mask``. ``indices`` and ``cu_seqlens`` come together.

        Returns:
            last_hidden_state ``(batch, seqlen, hidden)`` (zeros at padding when unpadded),
            pooler_output ``(batch, hidden)`` (from position 0, the [CLS] token: with left padding
            in the unpadded mode that row is zeros), hidden_states, attentions (a
            :class:`BaseModelOutputWithPoolingAndCrossAttentions`, or its non-None fields as a
            tuple when ``return_dict=False``).

        Raises:
            ValueError: both or neither of input_ids / inputs_embeds; input_ids not 2-D or
                inputs_embeds not 3-D; a wrongly shaped attention_mask; only one of indices /
                cu_seqlens. TypeError: input_ids not integer.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them, got "
                             f"{'both' if input_ids is not None else 'neither'}")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected 2 dims (batch, seqlen), got shape {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
        elif inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds: expected 3 dims (batch, seqlen, hidden), got shape "
                             f"{tuple(inputs_embeds.shape)}")
        if (indices is None) != (cu_seqlens is None):
            raise ValueError("indices, cu_seqlens: expected both (from unpad_metadata) or neither")
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        batch, seqlen = embeddings.shape[:2]
        if attention_mask is not None:  # bool, values checked (an additive mask is an error)
            attention_mask = padding_mask(attention_mask, batch, seqlen, embeddings.device)
        varlen = cu_seqlens is not None or (self.unpad and attention_mask is not None)
        kw: dict[str, Any] = {}
        probs_mask = attention_mask
        if varlen:
            if cu_seqlens is None:
                if torch.compiler.is_compiling():
                    raise RuntimeError(
                        "BertModel: the unpadded mode packs tokens with data-dependent shapes, which "
                        "torch.compile cannot trace; pass indices, cu_seqlens, max_seqlen = "
                        "unpad_metadata(attention_mask) computed outside the compiled region, or use "
                        "BertModel(config, unpad=False)")
                indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)
            kw = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if output_attentions:
                if probs_mask is None:
                    probs_mask = pad_input(torch.ones_like(indices, dtype=torch.bool), indices, batch, seqlen)
                kw.update(probs_mask=probs_mask, indices=indices)
            hidden = index_first_axis(embeddings, indices)  # [total_tokens, hidden]
            mask = None
        else:
            hidden, mask = embeddings, attention_mask  # [batch, seqlen, hidden]
        to_padded = (lambda h: pad_input(h, indices, batch, seqlen)) if varlen else (lambda h: h)
        all_hidden = (to_padded(hidden),) if output_hidden_states else None
        all_probs = () if output_attentions else None
        for layer in self.encoder.layer:
            hidden, probs = layer(hidden, mask, output_attentions=bool(output_attentions), **kw)
            if output_hidden_states:
                all_hidden += (to_padded(hidden),)
            if output_attentions:
                all_probs += (probs,)
        sequence_output = all_hidden[-1] if output_hidden_states else to_padded(hidden)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(sequence_output, pooled, all_hidden, all_probs)
        return out if return_dict is None or return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------


class BertPredictionHeadTransform(OpsModule, nn.Module):
    """``LayerNorm(act(dense(h)))``; a GELU fuses the dense bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.approximate, self.act_fn = resolve_activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.act_fn is not None:
            h = self.act_fn(self.dense(hidden_states))
        else:
            h = gelu(F.linear(hidden_states, self.dense.weight), bias=self.dense.bias,
                     approximate=self.approximate, backend=self.backend)
        return self.LayerNorm(h)


class BertLMPredictionHead(nn.Module):
    """Masked-LM scores ``decoder(transform(h))``; decoder weight tied to the word embeddings
    (when ``tie_word_embeddings``), decoder bias is ``self.bias``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    """``cls.predictions``: hidden ``(..., hidden)`` -> vocabulary logits ``(..., vocab_size)``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.predictions(sequence_output)


class BertPreTrainingHeads(nn.Module):
    """``cls``: MLM logits ``(..., vocab_size)`` from the sequence output and NSP logits
    ``(batch, 2)`` from the pooled output (BERT paper, sec. 3.1; label 0 = IsNext)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: Tensor, pooled_output: Tensor):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class _BertWithHead(BertPreTrainedModel):
    """A head model: ``self.bert`` (a :class:`BertModel`) plus a head; ``unpad`` is the encoder's."""

    def _build_bert(self, config, add_pooling_layer, unpad):
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer, unpad=unpad)

    def _finish_init(self, backend):
        self._init_weights([m for name, child in self.named_children() if name != "bert" for m in child.modules()])
        if self.config.tie_word_embeddings and hasattr(self, "cls"):
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.backend = backend

    @property
    def unpad(self) -> bool:
        return self.bert.unpad

    @unpad.setter
    def unpad(self, value: bool) -> None:
        self.bert.unpad = value

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                output_attentions, output_hidden_states, kw):
        return self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         output_attentions, output_hidden_states, True, **kw)


class BertForPreTraining(_BertWithHead):
    """BERT with the masked-LM and next-sentence-prediction heads (Devlin et al. 2019, sec. 3.1).

    Loss (appendix A.2): mean masked-LM cross-entropy over the labelled positions (label -100 =
    ignored) + mean NSP cross-entropy (``next_sentence_label`` 0 = IsNext, 1 = NotNext); returned
    only when both ``labels`` ``(batch, seqlen)`` and ``next_sentence_label`` ``(batch,)`` are given.
    """

    def __init__(self, config: BertConfig, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build_bert(config, True, unpad)
        self.cls = BertPreTrainingHeads(config)
        self._finish_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        kw = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, kw)
        scores, nsp = self.cls(out.last_hidden_state, out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            mlm = F.cross_entropy(scores.view(-1, self.config.vocab_size).float(), labels.view(-1), ignore_index=-100)
            loss = mlm + F.cross_entropy(nsp.view(-1, 2).float(), next_sentence_label.view(-1))
        res = BertForPreTrainingOutput(loss, scores, nsp, out.hidden_states, out.attentions)
        return res if return_dict is None or return_dict else res.to_tuple()


class BertForMaskedLM(_BertWithHead):
    """BERT with the masked-LM head; loss = mean cross-entropy over positions with label != -100."""

    def __init__(self, config: BertConfig, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build_bert(config, False, unpad)
        self.cls = BertOnlyMLMHead(config)
        self._finish_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        kw = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, kw)
        scores = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(scores.view(-1, self.config.vocab_size).float(), labels.view(-1), ignore_index=-100)
        res = MaskedLMOutput(loss, scores, out.hidden_states, out.attentions)
        return res if return_dict is None or return_dict else res.to_tuple()


class BertForSequenceClassification(_BertWithHead):
    """BERT with ``classifier(dropout(pooler_output))``.

    Loss per Hugging Face's ``problem_type`` (from the config, else inferred): ``regression``
    (``num_labels == 1``, e.g. STS-B; MSE), ``single_label_classification`` (integer labels;
    cross-entropy), ``multi_label_classification`` (float labels; BCE with logits).
    """

    def __init__(self, config: BertConfig, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self._build_bert(config, True, unpad)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._finish_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        kw = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, kw)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = (F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if self.num_labels == 1
                        else F.mse_loss(logits, labels.to(logits.dtype)))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        res = SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return res if return_dict is None or return_dict else res.to_tuple()
