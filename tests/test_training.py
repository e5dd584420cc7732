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


def _load_example(name: str):
    """Import ``examples/<name>.py`` (a script, not a package) as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fastbert_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["fastbert", "transformers"])
def test_pretraining_loss_is_the_models_loss(model):
    """examples/pretrain.py runs the MLM head on the labelled tokens only; that must be the same
    number as BertForPreTraining's own loss (mean MLM over labelled tokens + mean NSP)."""
    pretrain = _load_example("pretrain")
    cfg = pretrain.PretrainConfig(batch_size=4, max_seq_length=32, model=model, dropout=0.0, progress=False)
    torch.manual_seed(0)
    tokenizer = pretrain.load_tokenizer()
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    import random

    batch = next(pretrain.batches(pretrain.load_documents(), tokenizer, collator, cfg, random.Random(0)))
    selected = batch["labels"] != -100
    assert selected.any() and (batch["input_ids"][selected] == tokenizer.mask_token_id).any()
    net = pretrain.build_model(cfg, len(tokenizer), tokenizer.pad_token_id).eval()
    loss, mlm, nsp = pretrain.pretraining_loss(net, batch)
    want = net(**batch).loss
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a busy machine their spin-waits
    cost 5x (measured): run on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_pretraining_loss_falls_and_is_deterministic(one_thread):
    """200 steps of MLM + NSP on the committed corpus lower the combined loss clearly (measured:
    10.75 -> 7.12 over the first / last 20 steps), and a fixed seed reproduces it exactly."""
    pretrain = _load_example("pretrain")
    cfg = pretrain.PretrainConfig(steps=200, batch_size=8, max_seq_length=32, dropout=0.0, seed=0,
                                  progress=False)
    history = pretrain.train(cfg)
    losses = history["loss"]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, f"combined loss fell only from {first:.3f} to {last:.3f}"
    # The learning-rate schedule of a 5-step run equals the 200-step one over those steps (warmup).
    again = pretrain.train(pretrain.PretrainConfig(**{**vars(cfg), "steps": 5}))
    assert again["loss"] == losses[:5]
