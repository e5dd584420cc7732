"""The one output / loss helper every head uses, and where per-token heads run.

Losses are transformers' (same reductions, same ``problem_type`` inference, -100 = ignored):

- ``sequence``: ``regression`` (MSE; ``num_labels == 1`` squeezes), ``single_label_classification``
  (cross-entropy), ``multi_label_classification`` (BCE with logits), inferred when the config has
  no ``problem_type`` (and written to it, as transformers does);
- ``token`` / ``masked_lm``: mean cross-entropy over positions with label != -100;
- ``choice``: cross-entropy over ``(batch, num_choices)``;
- ``qa``: mean of the start and end cross-entropies, positions clamped to ``seqlen`` (ignored);
- ``nsp``: cross-entropy over ``(batch, 2)`` (0 = IsNext);
- ``pretraining`` (BERT): masked-LM + NSP, only when both labels are given;
- ``replaced_token`` (ELECTRA's discriminator): BCE with logits over real tokens.

Per-token heads (masked LM, token classification, question answering, ELECTRA's
discriminator) run on real tokens only in the unpadded mode: their logits are 0 at padding
positions (transformers computes them from the padding rows' hidden states, which nobody should
read). ``sparse_prediction=True`` (MLM and pre-training heads) runs the vocabulary projection only
where ``labels != -100`` and returns logits ``(num_labelled, vocab_size)`` in row-major order of
those positions (``logits[i]`` scores ``labels[labels != -100][i]``): the same loss and gradients,
a fraction of the FLOPs (BERT masks 15%). Without labels it returns the usual full logits.

A loss over every position sees those zeros: question answering's softmax over the sequence
(transformers includes the padding rows' arbitrary logits too; unpadded, each padding position adds
``exp(0)``; padded mode equals transformers), and token classification when padding labels are not
-100 (collators set -100).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import (MaskedLMOutput, MultipleChoiceModelOutput, NextSentencePredictorOutput,
                                           QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                           TokenClassifierOutput)
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput
from transformers.models.electra.modeling_electra import ElectraForPreTrainingOutput

from fastbert.models._base import return_dict_of
from fastbert.nn import EncoderOutput
from fastbert.nn.padding import pad_input


def classifier_dropout(config) -> float:
    """The head's dropout probability: ``classifier_dropout``, else ``hidden_dropout_prob``."""
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


def token_logits(head: Callable[[Tensor], Tensor], enc: EncoderOutput, labels: Optional[Tensor] = None,
                 sparse: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``head`` over the tokens that need it: ``(logits, labels_for_the_loss)``.

    sparse with labels: logits ``(num_labelled, ...)`` and ``labels[labels != -100]``; packed: the
    head on real tokens, scattered back to ``(batch, seqlen, ...)`` with zeros at padding; padded:
    every position.
    """
    if sparse and labels is not None:
        selected = labels != -100  # (batch, seqlen)
        return head(enc.last_hidden_state[selected]), labels[selected]
    if enc.packed is not None:
        batch, seqlen = enc.last_hidden_state.shape[:2]
        return pad_input(head(enc.packed), enc.indices, batch, seqlen), labels
    return head(enc.last_hidden_state), labels


def _ce(logits: Tensor, labels: Tensor, **kw) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device), **kw)


def _sequence_loss(model, logits: Tensor, labels: Tensor) -> Tensor:
    config, num_labels = model.config, model.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return _ce(logits.view(-1, num_labels), labels)
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type: expected 'regression', 'single_label_classification' or "
                     f"'multi_label_classification', got {config.problem_type!r}")


def task_output(task: str, model, logits, labels, enc: EncoderOutput, return_dict: Optional[bool], **extra):
    """The loss and transformers' output dataclass of ``task`` (see the module docstring).

    logits: ``sequence`` / ``token`` / ``masked_lm``: the head's scores; ``choice``:
    ``(batch * num_choices, 1)``; ``qa``: ``(..., seqlen, 2)``; ``nsp``: ``(batch, 2)``;
    ``pretraining``: ``(prediction_scores, seq_relationship_scores)``; ``replaced_token``:
    ``(batch, seqlen)``. ``extra``: ``start_positions`` / ``end_positions`` (qa),
    ``next_sentence_label`` (pretraining), ``attention_mask`` (replaced_token), ``num_choices``.
    Returns the dataclass, or its non-None fields as a tuple when ``return_dict`` is False.
    """
    loss, fields = None, {}
    if task == "sequence":
        loss = _sequence_loss(model, logits, labels) if labels is not None else None
        out_cls = SequenceClassifierOutput
    elif task in ("token", "masked_lm"):
        loss = _ce(logits, labels, ignore_index=-100) if labels is not None else None
        out_cls = TokenClassifierOutput if task == "token" else MaskedLMOutput
    elif task == "choice":
        logits = logits.view(-1, extra["num_choices"])
        loss = _ce(logits, labels) if labels is not None else None
        out_cls = MultipleChoiceModelOutput
    elif task == "nsp":
        loss = _ce(logits.view(-1, 2), labels) if labels is not None else None
        out_cls = NextSentencePredictorOutput
    elif task == "qa":
        start, end = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        sp, ep = extra.get("start_positions"), extra.get("end_positions")
        if sp is not None and ep is not None:
            ignored = start.size(1)  # positions outside the sequence are ignored
            sp, ep = (p.reshape(-1).clamp(0, ignored) for p in (sp, ep))
            loss = (_ce(start, sp, ignore_index=ignored) + _ce(end, ep, ignore_index=ignored)) / 2
        return _pack(QuestionAnsweringModelOutput, return_dict, model, loss=loss, start_logits=start,
                     end_logits=end, hidden_states=enc.hidden_states, attentions=enc.attentions)
    elif task == "pretraining":
        scores, nsp = logits
        nsl = extra.get("next_sentence_label")
        if labels is not None and nsl is not None:
            loss = _ce(scores, labels, ignore_index=-100) + _ce(nsp.view(-1, 2), nsl)
        return _pack(BertForPreTrainingOutput, return_dict, model, loss=loss, prediction_logits=scores,
                     seq_relationship_logits=nsp, hidden_states=enc.hidden_states, attentions=enc.attentions)
    elif task == "replaced_token":
        if labels is not None:
            mask = extra.get("attention_mask")
            if mask is not None:
                active = mask.reshape(logits.shape) == 1
                loss = F.binary_cross_entropy_with_logits(logits[active].float(), labels[active].float())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        out_cls = ElectraForPreTrainingOutput
    else:
        raise ValueError(f"task: unknown {task!r}")
    return _pack(out_cls, return_dict, model, loss=loss, logits=logits, hidden_states=enc.hidden_states,
                 attentions=enc.attentions, **fields)


def _pack(out_cls, return_dict, model, **fields):
    out = out_cls(**fields)
    return out if return_dict_of(model.config, return_dict) else out.to_tuple()


def flatten_choices(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """``(batch, num_choices, seqlen[, hidden])`` -> ``(batch * num_choices, seqlen[, hidden])``."""
    return [None if t is None else t.reshape((-1,) + tuple(t.shape[2:])) for t in tensors]


# ---- the task forwards: a family's class mixes one in and defines ``_head`` ---------------------
#
# ``_head(hidden)``: per-token tasks get ``(..., hidden)`` real tokens (or the labelled ones) and
# return per-token scores; sequence tasks get the padded last hidden state ``(batch, seqlen,
# hidden)`` and return ``(batch, num_labels)`` (``(batch * num_choices, 1)`` for multiple choice).


class TaskModel:
    """Shared by the task classes: the base model's encode with the packing metadata."""

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen) -> EncoderOutput:
        kw = dict(token_type_ids=token_type_ids) if token_type_ids is not None else {}
        return self.base_model.encode(input_ids, attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, indices=indices,
                                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)


class MaskedLMTask(TaskModel):
    """``forward(..., labels=None)`` -> ``MaskedLMOutput``; logits ``(batch, seqlen, vocab_size)``, or
    ``(num_labelled, vocab_size)`` with ``sparse_prediction`` and labels."""

    sparse_prediction = False

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, labels = token_logits(self._head, enc, labels, self.sparse_prediction)
        return task_output("masked_lm", self, logits, labels, enc, return_dict)


class SequenceClassificationTask(TaskModel):
    """``forward(..., labels=None)`` -> ``SequenceClassifierOutput``; logits ``(batch, num_labels)``."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        return task_output("sequence", self, self._head(enc.last_hidden_state), labels, enc, return_dict)


class TokenClassificationTask(TaskModel):
    """``forward(..., labels=None)`` -> ``TokenClassifierOutput``; logits ``(batch, seqlen, num_labels)``
    (0 at padding when unpadded). Head: ``classifier(dropout(h))`` in every family, built here with
    transformers' names; a family changes only the dropout probability (``_head_dropout``)."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad=unpad)
        self.dropout = nn.Dropout(self._head_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._fastbert_init(backend)

    @staticmethod
    def _head_dropout(config) -> float:
        return classifier_dropout(config)

    def _head(self, hidden):
        return self.classifier(self.dropout(hidden))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, labels = token_logits(self._head, enc, labels)
        return task_output("token", self, logits, labels, enc, return_dict)


class QuestionAnsweringTask(TaskModel):
    """``forward(..., start_positions=None, end_positions=None)`` -> ``QuestionAnsweringModelOutput``;
    start/end logits ``(batch, seqlen)``. Unpadded, they are 0 at padding: mask padding (as SQuAD
    post-processing restricts to context tokens anyway) before an argmax. Head: ``qa_outputs``
    (after ``dropout`` where the family has one: DistilBERT's ``_head_dropout``), built here."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad=unpad)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        p = self._head_dropout(config)
        if p is not None:
            self.dropout = nn.Dropout(p)
        self._fastbert_init(backend)

    @staticmethod
    def _head_dropout(config) -> Optional[float]:
        return None  # BERT's families: no dropout before qa_outputs

    def _head(self, hidden):
        drop = getattr(self, "dropout", None)
        return self.qa_outputs(hidden if drop is None else drop(hidden))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, _ = token_logits(self._head, enc)
        return task_output("qa", self, logits, None, enc, return_dict, start_positions=start_positions,
                           end_positions=end_positions)


class MultipleChoiceTask(TaskModel):
    """``forward(input_ids (batch, num_choices, seqlen), ..., labels (batch,))`` ->
    ``MultipleChoiceModelOutput``; logits ``(batch, num_choices)``. Precomputed packing metadata
    refers to the flattened ``(batch * num_choices, seqlen)`` batch."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        from fastbert.models._base import check_input_ids

        check_input_ids(input_ids, inputs_embeds, ndim=3)
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = flatten_choices(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        return task_output("choice", self, self._head(enc.last_hidden_state), labels, enc, return_dict,
                           num_choices=num_choices)
