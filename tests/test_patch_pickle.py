"""A patched transformers model round-trips through ``pickle`` / ``torch.save`` + ``torch.load``
(its instance forwards are :class:`~fastbert.integrations._hf.encoder.PatchedForward`, not bound
methods, which pickled as a ``getattr`` of an attribute the module does not have); the copy runs
the same fused path, ``unpatch`` works on it, and a fresh process finds ``attn_implementation="fastbert"``
registered. ``copy.deepcopy`` keeps working."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastbert.integrations._hf.encoder import PatchedForward  # noqa: E402
from fastbert.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":  # add & norm, intermediate and encoder forwards
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32)
        return transformers.BertForSequenceClassification(cfg).eval()
    if family == "distilbert":  # DistilBERT's Transformer forward
        cfg = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=32)
        return transformers.DistilBertModel(cfg).eval()
    cfg = transformers.ModernBertConfig(  # the ModernBertModel forward
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return transformers.ModernBertModel(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        res = model(**inputs)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
@pytest.mark.parametrize("roundtrip", [lambda m: pickle.loads(pickle.dumps(m)), _torch_roundtrip, copy.deepcopy],
                         ids=["pickle", "torch.save", "deepcopy"])
def test_patched_model_roundtrips_and_unpatches(family, roundtrip):
    plain = _model(family)
    model = patch(copy.deepcopy(plain))
    inputs = _inputs()
    before = _out(model, inputs)
    loaded = roundtrip(model)
    assert loaded is not model and is_patched(loaded)
    forwards = [m.__dict__["forward"] for m in loaded.modules() if "forward" in m.__dict__]
    assert forwards and all(isinstance(f, PatchedForward) for f in forwards)
    owners = {id(m) for m in loaded.modules()}
    assert all(id(f.args[0]) in owners for f in forwards)  # bound to the copy's modules, not the original's
    torch.testing.assert_close(_out(loaded, inputs), before, rtol=0, atol=0)
    pickle.loads(pickle.dumps(loaded))  # a loaded model pickles again
    unpatch(loaded)
    assert not is_patched(loaded)
    assert not any("forward" in m.__dict__ for m in loaded.modules())
    assert not loaded._forward_pre_hooks  # the mask-check hook is gone
    assert loaded.config._attn_implementation == plain.config._attn_implementation
    real = inputs["attention_mask"].bool()
    got, ref = _out(loaded, inputs), _out(plain, inputs)
    if got.dim() == 3:  # hidden states: transformers computes padding rows, compare real tokens
        got, ref = got[real], ref[real]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # transformers' own forward again


def test_torch_load_in_a_fresh_process_registers_fastbert_attention(tmp_path):
    """The loaded model's config names attn_implementation="fastbert"; a process that never called
    register() must still run it (the decoder path looks the attention function up by that name)."""
    model = _model("bert").bert
    model.config.is_decoder = True  # transformers' layer loop: the attention function is looked up by name
    model = patch(model)
    inputs = _inputs()
    path = tmp_path / "patched.pt"
    torch.save({"model": model, "inputs": inputs, "out": _out(model, inputs)}, path)
    code = ("import sys, torch\n"
            "d = torch.load(sys.argv[1], weights_only=False)\n"
            "with torch.no_grad():\n"
            "    out = d['model'](**d['inputs']).last_hidden_state\n"
            "torch.testing.assert_close(out, d['out'], rtol=0, atol=0)\n"
            "print(d['model'].config._attn_implementation)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "fastbert"
