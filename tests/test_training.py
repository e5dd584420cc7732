"""Training with fastbert: transformers.Trainer on a patched model, and MLM + NSP pre-training
(examples/pretrain.py) of a tiny BERT on the committed corpus."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from fastbert.integrations.transformers import is_patched, patch  # noqa: E402


def _small_config(**kwargs) -> BertConfig:
    base = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=2)
    base.update(kwargs)
    return BertConfig(**base)


class _Pairs(torch.utils.data.Dataset):
    """Random sentence-pair-like examples of varied lengths (the collator pads them)."""

    def __init__(self, n=16, vocab=120, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            length = int(torch.randint(4, 14, (), generator=g))
            ids = torch.randint(5, vocab, (length,), generator=g).tolist()
            self.items.append({"input_ids": ids, "token_type_ids": [0] * (length // 2) + [1] * (length - length // 2),
                               "attention_mask": [1] * length, "labels": i % 2})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(features):
    seqlen = max(len(f["input_ids"]) for f in features)
    pad = lambda key: torch.tensor([f[key] + [0] * (seqlen - len(f[key])) for f in features])  # noqa: E731
    return {"input_ids": pad("input_ids"), "token_type_ids": pad("token_type_ids"),
            "attention_mask": pad("attention_mask"), "labels": torch.tensor([f["labels"] for f in features])}


class _RecordingTrainer(Trainer):
    """Keeps every training-step loss, unrounded (Trainer's logs round to 4 digits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if model.training:
            self.step_losses.append((loss[0] if return_outputs else loss).detach().clone())
        return loss


def _train_two_steps(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = _RecordingTrainer(model=model, args=args, train_dataset=_Pairs(), data_collator=_collate)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    return trainer.step_losses, moved


def test_trainer_runs_on_patched_model(tmp_path):
    torch.manual_seed(0)
    ref = BertForSequenceClassification(_small_config())
    model = BertForSequenceClassification(_small_config())
    model.load_state_dict(ref.state_dict())
    patch(model)
    losses, moved = _train_two_steps(model, tmp_path / "patched")
    ref_losses, _ = _train_two_steps(ref, tmp_path / "ref")
    assert is_patched(model)
    assert len(losses) == len(ref_losses) == 2
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-6, atol=1e-6)
    # After one AdamW step the models have moved; the second losses agree to fp32 roundoff growth.
    torch.testing.assert_close(losses[1], ref_losses[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(losses[0], losses[1])
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert "bert.encoder.layer.1.output.dense.bias" in moved  # the fused bias gets its gradient
